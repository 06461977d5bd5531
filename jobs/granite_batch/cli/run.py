"""`granite-batch run`: transcribe or translate the recordings of a manifest into Parquet."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from granite_batch.cli.common import (
    EXIT_OK,
    comma_list,
    exit_code,
    lease_arguments,
    lease_overrides,
    prefix_list,
)

if TYPE_CHECKING:
    from granite_batch.config import JobConfig

# Each flag (its argparse dest) and the config field it sets, as a dotted path; a flag not given sets
# nothing. A new flag that sets one field is one line here (flags that set several: `_overrides`).
FLAG_FIELDS = {
    "manifest": "manifest",
    "input": "input",
    "output": "output",
    "revision": "revision",
    "speakers": "speakers",
    "punctuation": "punctuation",
    "language": "language",
    "detect_language": "detect_language",
    "task": "task",
    "target_language": "target_language",
    "keywords": "keywords",
    "batch_size": "batch_size",
    "max_batch_audio_s": "max_batch_audio_s",
    "max_segment_s": "max_segment_s",
    "max_duration_s": "max_duration_s",
    "subtitles": "subtitles",
    "word_timestamps": "word_timestamps",
    "max_failed_fraction": "max_failed_fraction",
    "device": "device",
    "dtype": "dtype",
    "trust_remote_code": "trust_remote_code",
    "run_id": "run_id",
    "retry_failed": "retry_failed",
    "allowed_prefixes": "allowed_prefixes",
    "decode_timeout_s": "decode_timeout_s",
    "channels": "channels",
    "reference_column": "reference_column",
    "max_new_tokens": "generation.max_new_tokens",
    "max_new_tokens_per_audio_s": "generation.max_new_tokens_per_audio_s",
    "num_beams": "generation.num_beams",
    "decoding": "generation.decoding",
    "endpoint_url": "storage_options.s3.endpoint_url",
    "anon": "storage_options.s3.anon",
    "format": "output_format",
    "engine": "engine",
}


def register(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="transcribe/translate the recordings of a manifest into Parquet")
    job_arguments(run)
    run.set_defaults(handler=_cmd_run)


def job_arguments(parser: argparse.ArgumentParser) -> None:
    """The job's flags, grouped by topic for `--help` (`run`, and `config show`, which prints what `run` would use)."""
    config = parser.add_argument_group(
        "configuration", "layered: defaults < --config < GRANITE_BATCH_* < flags < --set"
    )
    config.add_argument("--config", help="job YAML; flags given here override its fields")
    config.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="set any config field by its dotted path, the value read as YAML "
        "(e.g. resources.gpus_per_actor=0.5, subtitles='[srt, vtt]'); repeatable, the last word",
    )
    inputs = parser.add_argument_group("input", "what to transcribe, and what a row means where it does not say")
    inputs.add_argument("--manifest", help="manifest file, folder or prefix (.jsonl/.json/.csv/.parquet)")
    inputs.add_argument(
        "--input",
        help="no manifest: list recordings under a prefix or glob, e.g. "
        "'s3://bucket/archive/{language}/**/*.mp3' ({language} takes the language from the path)",
    )
    inputs.add_argument(
        "--language",
        help="language spoken where a row does not say (default en), or auto: identify it from the transcript",
    )
    inputs.add_argument(
        "--detect-language",
        action="store_true",
        default=None,
        help="also identify rows that name their language; disagreements are counted in the summary",
    )
    inputs.add_argument("--task", choices=["asr", "ast"], help="asr (transcribe) or ast (translate); default asr")
    inputs.add_argument("--target-language", help="translation target where a row does not say")
    inputs.add_argument("--keywords", type=comma_list, help="comma-separated keywords for rows without their own")
    inputs.add_argument(
        "--reference-column", help="manifest column of reference texts when not `reference` (e.g. text)"
    )
    inputs.add_argument(
        "--channels",
        choices=["mix", "split"],
        help="mix: downmix to mono (default); split: transcribe each channel on its own",
    )
    inputs.add_argument(
        "--allowed-prefixes",
        type=prefix_list,
        help="comma-separated URI/path prefixes recordings must lie under; "
        "others become error rows (e.g. 's3://archive/,/mnt/audio/')",
    )
    inputs.add_argument("--max-duration-s", type=float, help="longer recordings become error rows (default 21600)")
    inputs.add_argument("--decode-timeout-s", type=float, help="longest decode of one recording (default 900)")

    output = parser.add_argument_group("output", "where rows go and what they hold")
    output.add_argument("--output", help="output dataset root (local path or URI)")
    output.add_argument(
        "--speakers",
        action="store_true",
        default=None,
        help="speaker-attributed transcripts where the model labels speakers (4.1-2b-plus)",
    )
    output.add_argument(
        "--punctuation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="punctuated transcripts (4.1-2b); default: wherever the model can",
    )
    output.add_argument(
        "--subtitles", type=comma_list, help="comma-separated subtitle formats to write per recording: srt, vtt"
    )
    output.add_argument(
        "--word-timestamps",
        action="store_true",
        default=None,
        help="also give each segment its words with start/end times and confidences (segments[].words)",
    )
    output.add_argument(
        "--retry-failed",
        action="store_true",
        default=None,
        help="also redo ids whose row in the output has an error (done ids are always skipped)",
    )
    output.add_argument("--max-failed-fraction", type=float, help="exit non-zero above this share of failed rows")
    output.add_argument("--run-id", help="name this run (default: UTC time + random suffix)")
    output.add_argument(
        "--redo-model",
        action="append",
        metavar="NAME",
        help="also redo ids whose committed row NAME made (its `model` column), with the job's models; "
        "the new row takes the old one's place (repeatable)",
    )
    output.add_argument(
        "--redo-where",
        action="append",
        metavar="SELECTION",
        help="also redo ids whose committed row this holds for: `column op value` terms joined by `and`, "
        "e.g. 'run_id < 20261001' or 'segments.avg_logprob < -1' (repeatable; see config field redo)",
    )
    output.add_argument("--format", choices=["parquet", "delta"], help="output format (default parquet)")

    models = parser.add_argument_group("models", "which checkpoints, and where they run")
    models.add_argument(
        "--model",
        action="append",
        help="model id on the Hub or local folder (default ibm-granite/granite-4.0-1b-speech); repeat it "
        "to route each row to the first model that serves it",
    )
    models.add_argument(
        "--escalate-below",
        type=float,
        help="a cascade: segments of the first --model whose confidence (avg_logprob) is below this go on "
        "to the next --model that serves the row, e.g. -0.3 (docs: how-to/cascade)",
    )
    models.add_argument(
        "--escalate-on",
        help="a cascade: comma-separated quality flags (low_confidence, repetition, truncated, rate) that send "
        "segments of the first --model on to the next",
    )
    models.add_argument("--revision", help="model revision (branch, tag or commit)")
    models.add_argument(
        "--engine",
        choices=("transformers", "vllm"),
        help="what decodes the LLM-based models: transformers (default) or vllm (vLLM installed beside the job)",
    )
    models.add_argument("--device", choices=["auto", "cpu", "cuda"])
    models.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    models.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="run code shipped with the model repository (off by default; see README)",
    )

    decoding = parser.add_argument_group("decoding", "segments, batches and generation")
    decoding.add_argument(
        "--max-segment-s",
        type=float,
        help="longest segment sent to the model (default: the model's own, 30 s; 180 s for 4.1-2b-plus)",
    )
    decoding.add_argument(
        "--batch-size", type=int, help="speech segments per generate call (default 256 on a GPU, 32 on CPU)"
    )
    decoding.add_argument(
        "--max-batch-audio-s",
        type=float,
        help="padded audio seconds per generate call (default 7680 on a GPU, 480 on CPU)",
    )
    decoding.add_argument(
        "--max-new-tokens",
        type=int,
        help="cap on any segment's new tokens (default: none beyond the per-second budget)",
    )
    decoding.add_argument(
        "--max-new-tokens-per-audio-s",
        type=float,
        help="a segment's token budget: 16 + this per audio second (default 12)",
    )
    decoding.add_argument("--num-beams", type=int, help="beam search width (default 1: greedy)")
    decoding.add_argument(
        "--decoding",
        choices=["autoregressive", "speculative-strict", "speculative"],
        help="autoregressive (default), speculative-strict (CTC drafts, output identical to "
        "greedy) or speculative (IBM's relaxed acceptance)",
    )

    resources = parser.add_argument_group("resources", "what the job asks Ray for (more: --set resources.FIELD=...)")
    resources.add_argument("--model-actors", type=int, help="model actors (GPUs) to use; see --max-model-actors")
    resources.add_argument("--max-model-actors", type=int, help="let the model actor pool grow to this size")

    storage = parser.add_argument_group("storage", "object stores (credentials come from the environment)")
    storage.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, R2); AWS_ENDPOINT_URL also works")
    storage.add_argument("--anon", action="store_true", default=None, help="read public buckets without credentials")

    lease_arguments(parser.add_argument_group("lease", "one run at a time per output root"))
    misc = parser.add_argument_group("misc")
    misc.add_argument(
        "--no-progress", action="store_true", help="no progress line (recordings, failures, audio hours, ETA)"
    )
    misc.add_argument("-v", "--verbose", action="store_true")


def _models(args: argparse.Namespace) -> dict:
    """`--model` once: the job's model; repeated: its routed model list, the first escalating as
    `--escalate-below` / `--escalate-on` say."""
    names = args.model
    escalation = {
        "escalate_below": args.escalate_below,
        "escalate_on": None
        if args.escalate_on is None
        else [f.strip() for f in args.escalate_on.split(",") if f.strip()],
    }
    escalation = {key: value for key, value in escalation.items() if value is not None}
    if escalation and len(names or []) < 2:
        from granite_batch.config import ConfigError

        raise ConfigError(
            "--escalate-below and --escalate-on need two --model or more: the first escalates to the next"
        )
    if not names:
        return {}
    if len(names) == 1:
        return {"model": names[0], "models": []}
    return {"models": [{"model": names[0], **escalation}] + [{"model": name} for name in names[1:]]}


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags given, as a nested layer of config fields (FLAG_FIELDS, and the flags that set several)."""
    overrides: dict[str, Any] = {}
    for dest, path in FLAG_FIELDS.items():
        value = getattr(args, dest)
        if value is None:
            continue
        *groups, name = path.split(".")
        target = overrides
        for group in groups:
            target = target.setdefault(group, {})
        target[name] = value
    overrides.update(_models(args))
    redo = [f"model == {name}" for name in args.redo_model or []] + (args.redo_where or [])
    if redo:
        overrides["redo"] = redo
    if args.model_actors is not None:
        overrides["resources"] = {
            "model_actors_min": args.model_actors,
            "model_actors_max": max(args.model_actors, args.max_model_actors or 0),
        }
    elif args.max_model_actors is not None:
        overrides["resources"] = {"model_actors_max": args.max_model_actors}
    return {**overrides, **lease_overrides(args)}


def job_config(args: argparse.Namespace) -> JobConfig:
    """The job's config from every layer: --config, the environment, the flags, --set (ConfigError if invalid)."""
    from granite_batch.config import load_config

    return load_config(args.config, _overrides(args), sets=args.set, environment=True)


def _print_cascade(pair: dict, inference: dict) -> None:
    """One escalation pair: what went on and why, and what the second model decoded against all of it."""
    source, target = pair["from"], pair["to"]
    first_s = inference.get(source, {}).get("audio_s") or 0.0
    why = ", ".join(f"{flag} {count}" for flag, count in pair["why"].items())
    share = f" ({pair['audio_s'] / first_s:.1%})" if first_s else ""
    print(
        f"  cascade {source} -> {target}: {pair['segments']} segments escalated ({why}); {target} decoded "
        f"{pair['audio_s']:.1f} s{share} of the {first_s:.1f} s it would have decoded without {source}, "
        f"which decoded all of it"
    )


def _print_summary(summary: dict, path: str) -> None:
    print(
        f"\nrun {summary['run_id']}: {summary['rows_ok']} ok, {summary['rows_failed']} failed, "
        f"{summary['rows_already_done']} already done, {summary['duplicates']} duplicate ids; "
        f"{summary['audio_hours'] * 60:.1f} min of audio in {summary['wall_s']:.1f} s "
        f"(RTFx {summary['rtfx']}: audio seconds per wall second)"
    )
    for reason, count in summary["failures_by_reason"].items():
        print(f"  failed: {count:>6}  {reason}")
    for selection, count in summary.get("redo", {}).get("planned", {}).items():
        print(f"  redone: {count:>6}  {selection}")
    for model, figures in summary.get("inference", {}).items():
        padding = figures["padding_fraction"]
        print(
            f"  inference ({model}): {figures['segments']} segments in {figures['generate_calls']} generate calls "
            f"({figures['mean_segments_per_call']} per call), padding {'-' if padding is None else f'{padding:.1%}'}, "
            f"{figures['new_tokens']} new tokens, {figures['truncated_segments']} segments stopped at their budget"
        )
        if figures.get("low_confidence_fraction") is not None:
            print(
                f"  low confidence ({model}): {figures['low_confidence_segments']} segments "
                f"({figures['low_confidence_fraction']:.1%} of those scored) worth a look by hand"
            )
    for pair in summary.get("cascade") or []:
        _print_cascade(pair, summary.get("inference", {}))
    detection = summary.get("language_detection")
    if detection:
        found = ", ".join(
            f"{language} {figures['rows']} (mean confidence {figures['mean_confidence']:.2f})"
            for language, figures in detection["by_language"].items()
        )
        print(f"  languages identified: {found}; {detection['disagreements']['rows']} disagree with the manifest")
    print(f"summary: {path}")


def _cmd_run(args: argparse.Namespace) -> int:
    try:
        config = job_config(args)
        from granite_batch.run.transcription import run_job

        result = run_job(config, progress=not args.no_progress)
    except (Exception, KeyboardInterrupt) as exc:  # exit codes: cli/common.py
        return exit_code(exc, "job")
    _print_summary(result.summary, result.summary_path)
    return EXIT_OK
