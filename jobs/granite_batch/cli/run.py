"""`granite-batch run`: transcribe or translate the recordings of a manifest into Parquet."""

from __future__ import annotations

import argparse
import sys

from granite_batch.cli.common import (
    EXIT_CONFIG,
    EXIT_MODEL,
    EXIT_OK,
    EXIT_RUNTIME,
    EXIT_TOO_MANY_FAILURES,
    could_not_finish,
    interrupted,
    lease_arguments,
    lease_overrides,
    prefix_list,
)


def register(commands: argparse._SubParsersAction) -> None:
    run = commands.add_parser("run", help="transcribe/translate the recordings of a manifest into Parquet")
    run.add_argument("--config", help="job YAML; flags given here override its fields")
    run.add_argument("--manifest", help="manifest file, folder or prefix (.jsonl/.json/.csv/.parquet)")
    run.add_argument(
        "--input",
        help="no manifest: list recordings under a prefix or glob, e.g. "
        "'s3://bucket/archive/{language}/**/*.mp3' ({language} takes the language from the path)",
    )
    run.add_argument("--output", help="output dataset root (local path or URI)")
    run.add_argument(
        "--model",
        action="append",
        help="model id on the Hub or local folder (default ibm-granite/granite-4.0-1b-speech); repeat it "
        "to route each row to the first model that serves it",
    )
    run.add_argument(
        "--speakers",
        action="store_true",
        default=None,
        help="speaker-attributed transcripts where the model labels speakers (4.1-2b-plus)",
    )
    run.add_argument(
        "--punctuation",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="punctuated transcripts (4.1-2b); default: wherever the model can",
    )
    run.add_argument("--revision", help="model revision (branch, tag or commit)")
    run.add_argument(
        "--engine",
        choices=("transformers", "vllm"),
        help="what decodes the LLM-based models: transformers (default) or vllm (vLLM installed beside the job)",
    )
    run.add_argument(
        "--language",
        help="language spoken where a row does not say (default en), or auto: identify it from the transcript",
    )
    run.add_argument(
        "--detect-language",
        action="store_true",
        default=None,
        help="also identify rows that name their language; disagreements are counted in the summary",
    )
    run.add_argument("--task", choices=["asr", "ast"], help="asr (transcribe) or ast (translate); default asr")
    run.add_argument("--target-language", help="translation target where a row does not say")
    run.add_argument("--keywords", help="comma-separated keywords for rows without their own")
    run.add_argument(
        "--batch-size", type=int, help="speech segments per generate call (default 256 on a GPU, 32 on CPU)"
    )
    run.add_argument(
        "--max-batch-audio-s",
        type=float,
        help="padded audio seconds per generate call (default 7680 on a GPU, 480 on CPU)",
    )
    run.add_argument(
        "--max-new-tokens",
        type=int,
        help="cap on any segment's new tokens (default: none beyond the per-second budget)",
    )
    run.add_argument(
        "--max-new-tokens-per-audio-s",
        type=float,
        help="a segment's token budget: 16 + this per audio second (default 12)",
    )
    run.add_argument("--num-beams", type=int, help="beam search width (default 1: greedy)")
    run.add_argument(
        "--decoding",
        choices=["autoregressive", "speculative-strict", "speculative"],
        help="autoregressive (default), speculative-strict (CTC drafts, output identical to "
        "greedy) or speculative (IBM's relaxed acceptance)",
    )
    run.add_argument("--max-segment-s", type=float, help="longest segment sent to the model (default 30)")
    run.add_argument("--max-duration-s", type=float, help="longer recordings become error rows (default 21600)")
    run.add_argument("--subtitles", help="comma-separated subtitle formats to write per recording: srt, vtt")
    run.add_argument(
        "--word-timestamps",
        action="store_true",
        default=None,
        help="also give each segment its words with start/end times and confidences (segments[].words)",
    )
    run.add_argument("--max-failed-fraction", type=float, help="exit non-zero above this share of failed rows")
    run.add_argument("--device", choices=["auto", "cpu", "cuda"])
    run.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    run.add_argument("--model-actors", type=int, help="model actors (GPUs) to use; see --max-model-actors")
    run.add_argument("--max-model-actors", type=int, help="let the model actor pool grow to this size")
    run.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="run code shipped with the model repository (off by default; see README)",
    )
    run.add_argument("--endpoint-url", help="S3-compatible endpoint (MinIO, Ceph, R2); AWS_ENDPOINT_URL also works")
    run.add_argument("--anon", action="store_true", default=None, help="read public buckets without credentials")
    run.add_argument(
        "--allowed-prefixes",
        type=prefix_list,
        help="comma-separated URI/path prefixes recordings must lie under; "
        "others become error rows (e.g. 's3://archive/,/mnt/audio/')",
    )
    run.add_argument("--decode-timeout-s", type=float, help="longest decode of one recording (default 900)")
    run.add_argument("--reference-column", help="manifest column of reference texts when not `reference` (e.g. text)")
    run.add_argument(
        "--channels",
        choices=["mix", "split"],
        help="mix: downmix to mono (default); split: transcribe each channel on its own",
    )
    run.add_argument(
        "--retry-failed",
        action="store_true",
        default=None,
        help="also redo ids whose row in the output has an error (done ids are always skipped)",
    )
    run.add_argument("--run-id", help="name this run (default: UTC time + random suffix)")
    lease_arguments(run)
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("-v", "--verbose", action="store_true")

    run.set_defaults(handler=_cmd_run)


def _models(names: list[str] | None) -> dict:
    """`--model` once: the job's model; repeated: its routed model list."""
    if not names:
        return {}
    return {"model": names[0], "models": []} if len(names) == 1 else {"models": [{"model": name} for name in names]}


def _overrides(args: argparse.Namespace) -> dict:
    generation = {
        "max_new_tokens": args.max_new_tokens,
        "max_new_tokens_per_audio_s": args.max_new_tokens_per_audio_s,
        "num_beams": args.num_beams,
        "decoding": args.decoding,
    }
    resources = {}
    if args.model_actors is not None:
        resources["model_actors_min"] = args.model_actors
        resources["model_actors_max"] = max(args.model_actors, args.max_model_actors or 0)
    elif args.max_model_actors is not None:
        resources["model_actors_max"] = args.max_model_actors
    s3 = {"endpoint_url": args.endpoint_url, "anon": args.anon}
    s3 = {key: value for key, value in s3.items() if value is not None}
    allowed = (
        None if args.allowed_prefixes is None else [p.strip() for p in args.allowed_prefixes.split(",") if p.strip()]
    )
    keywords = None if args.keywords is None else [k.strip() for k in args.keywords.split(",") if k.strip()]
    return {
        "manifest": args.manifest,
        "input": args.input,
        "output": args.output,
        "revision": args.revision,
        "engine": args.engine,
        **_models(args.model),
        "speakers": args.speakers,
        "punctuation": args.punctuation,
        "language": args.language,
        "detect_language": args.detect_language,
        "task": args.task,
        "target_language": args.target_language,
        "keywords": keywords,
        "batch_size": args.batch_size,
        "max_batch_audio_s": args.max_batch_audio_s,
        "max_segment_s": args.max_segment_s,
        "max_duration_s": args.max_duration_s,
        "subtitles": None if args.subtitles is None else [f.strip() for f in args.subtitles.split(",") if f.strip()],
        "word_timestamps": args.word_timestamps,
        "max_failed_fraction": args.max_failed_fraction,
        "device": args.device,
        "dtype": args.dtype,
        "trust_remote_code": args.trust_remote_code,
        "run_id": args.run_id,
        "retry_failed": args.retry_failed,
        "allowed_prefixes": allowed,
        "decode_timeout_s": args.decode_timeout_s,
        "channels": args.channels,
        "reference_column": args.reference_column,
        "generation": {k: v for k, v in generation.items() if v is not None} or None,
        "resources": resources or None,
        "storage_options": {"s3": s3} if s3 else None,
        **lease_overrides(args),
    }


def _print_summary(summary: dict, path: str) -> None:
    print(
        f"\nrun {summary['run_id']}: {summary['rows_ok']} ok, {summary['rows_failed']} failed, "
        f"{summary['rows_already_done']} already done, {summary['duplicates']} duplicate ids; "
        f"{summary['audio_hours'] * 60:.1f} min of audio in {summary['wall_s']:.1f} s "
        f"(real-time factor {summary['real_time_factor']})"
    )
    for reason, count in summary["failures_by_reason"].items():
        print(f"  failed: {count:>6}  {reason}")
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
    detection = summary.get("language_detection")
    if detection:
        found = ", ".join(
            f"{language} {figures['rows']} (mean confidence {figures['mean_confidence']:.2f})"
            for language, figures in detection["by_language"].items()
        )
        print(f"  languages identified: {found}; {detection['disagreements']['rows']} disagree with the manifest")
    print(f"summary: {path}")


def _cmd_run(args: argparse.Namespace) -> int:
    from granite_batch.config import ConfigError, load_config
    from granite_batch.inputs.rows import ManifestError
    from granite_batch.models.hub import ModelLoadError

    try:
        config = load_config(args.config, _overrides(args))
    except ConfigError as exc:
        print(f"granite-batch: {exc}", file=sys.stderr)
        return EXIT_CONFIG

    from granite_batch.run.bookkeeping import TooManyFailures
    from granite_batch.run.lease import LeaseError, LeaseUnsupported
    from granite_batch.run.transcription import run_job

    try:
        result = run_job(config, progress=not args.no_progress)
    except KeyboardInterrupt as exc:
        return interrupted(exc)
    except (ConfigError, LeaseUnsupported) as exc:
        print(f"granite-batch: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LeaseError as exc:  # another run holds the output, or took it over from this one
        print(f"granite-batch: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except ManifestError as exc:
        print(f"granite-batch: bad manifest: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except ModelLoadError as exc:
        print(f"granite-batch: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except TooManyFailures as exc:
        print(f"granite-batch: {exc}", file=sys.stderr)
        return EXIT_TOO_MANY_FAILURES
    except Exception as exc:  # the job could not finish
        return could_not_finish("job", exc)
    _print_summary(result.summary, result.summary_path)
    return EXIT_OK
