"""`granite-batch`: run a transcription job, or write a tiny checkpoint for tests and trials."""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys

EXIT_OK = 0
EXIT_CONFIG = 2  # bad configuration or manifest: nothing was done
EXIT_MODEL = 3  # the model cannot be loaded: nothing was done
EXIT_RUNTIME = 4  # the job could not run to the end (storage unreachable, cluster failure)
EXIT_TOO_MANY_FAILURES = 5  # the job ran, but more rows failed than --max-failed-fraction allows

log = logging.getLogger("granite_batch")

LANGUAGE_CODE = re.compile(r"^[a-z]{2,3}([-_][a-z0-9]{2,8})*$", re.IGNORECASE)


def _prefix_list(value: str) -> str:
    """`--allowed-prefixes`: an allow-list given but empty (`" , "`, from an empty template
    variable) is a usage error (exit 2), never a list that allows everything."""
    if not any(part.strip() for part in value.split(",")):
        raise argparse.ArgumentTypeError(f"{value!r} names no prefix; give at least one, or leave the flag out")
    return value


def _language_code(value: str) -> str:
    """A language code (`en`, `pt-BR`, `und`): it names a partition and a report file, so nothing
    path-like gets through (exit 2)."""
    if not LANGUAGE_CODE.match(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a language code (e.g. en, pt-BR)")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="granite-batch", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

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
        type=_prefix_list,
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
    _lease_arguments(run)
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("-v", "--verbose", action="store_true")

    status = commands.add_parser("status", help="list the runs of an output root and what is done, failed, pending")
    status.add_argument("output", help="output dataset root")
    status.add_argument("--manifest", help="also count the manifest's ids that have no row yet")
    status.add_argument(
        "--language", type=_language_code, default="en", help="the job's --language, for manifest ids (default en)"
    )
    status.add_argument("--endpoint-url", help="S3-compatible endpoint")

    tiny = commands.add_parser("tiny-model", help="write a tiny random Granite Speech checkpoint to DIR")
    tiny.add_argument("directory")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument(
        "--model-type",
        default="granite_speech",
        choices=("granite_speech", "granite_speech_plus", "granite_speech5_ctc"),
        help="architecture: granite_speech (4.0-1b, 4.1-2b), granite_speech_plus (4.1-2b-plus) or "
        "granite_speech5_ctc (5.0 TurboCTC); default granite_speech",
    )

    second = commands.add_parser(
        "second-pass",
        help="run a Granite language model over the transcripts of OUTPUT "
        "(summaries, topics, answers) into OUTPUT/second_pass/NAME",
    )
    second.add_argument("output", help="output dataset root holding transcripts/")
    second.add_argument(
        "--template",
        default="summary",
        help="summary (default), topics, qa, or a Jinja file "
        "that uses {{ transcript }} (and may use stage, part, parts, question)",
    )
    second.add_argument("--question", help="the question for --template qa")
    second.add_argument("--name", help="output dataset name (default: the template's name or file stem)")
    second.add_argument("--model", help="causal LM id or local folder (default ibm-granite/granite-4.0-micro)")
    second.add_argument("--revision", help="model revision (branch, tag or commit)")
    second.add_argument("--max-new-tokens", type=int, help="generation limit per prompt (default 256)")
    second.add_argument("--batch-size", type=int, help="prompts per generate call (default 8)")
    second.add_argument("--context-tokens", type=int, help="cap the context (default: the model's)")
    second.add_argument("--model-actors", type=int, help="language model actors (default 1)")
    second.add_argument("--device", choices=["auto", "cpu", "cuda"])
    second.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"])
    second.add_argument(
        "--retry-failed",
        action="store_true",
        help="also redo transcripts whose second-pass row has an error (that row is replaced)",
    )
    second.add_argument("--run-id", help="name this run (default: UTC time + random suffix)")
    _lease_arguments(second)
    second.add_argument("--endpoint-url", help="S3-compatible endpoint")
    second.add_argument("--no-progress", action="store_true", help="no progress bars")
    second.add_argument("-v", "--verbose", action="store_true")

    tiny_lm = commands.add_parser("tiny-lm", help="write a tiny random Granite language model checkpoint to DIR")
    tiny_lm.add_argument("directory")
    tiny_lm.add_argument("--seed", type=int, default=0)

    evaluate = commands.add_parser(
        "eval",
        help="score transcripts and translations against the manifest's "
        "reference column (WER/CER, BLEU/chrF); writes OUTPUT/eval/RUN_ID.json",
    )
    evaluate.add_argument("output", help="output dataset root")
    evaluate.add_argument("--run", help="score this run's rows, or 'all' for every row (default: the newest run)")
    evaluate.add_argument("--language", type=_language_code, help="only rows of this recording language")
    evaluate.add_argument("--task", choices=["asr", "ast"], help="only rows of this task")
    evaluate.add_argument("--endpoint-url", help="S3-compatible endpoint")
    return parser


def _lease_arguments(command: argparse.ArgumentParser) -> None:
    command.add_argument(
        "--no-wait",
        action="store_true",
        default=None,
        help="exit 4 at once when another run holds the output (default: wait, see --lease-wait-s)",
    )
    command.add_argument("--lease-wait-s", type=float, help="longest wait for another run's lease (default 3600)")
    command.add_argument(
        "--no-lease",
        action="store_true",
        default=None,
        help="take no lease: for stores without conditional writes; one run at a time is then up to you",
    )


def _lease_overrides(args: argparse.Namespace) -> dict:
    return {"lease": "none" if args.no_lease else None, "lease_wait_s": 0.0 if args.no_wait else args.lease_wait_s}


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
        **_lease_overrides(args),
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


def _could_not_finish(what: str, exc: Exception) -> int:
    """Say in one line why a run stopped (details in the debug log); a model that failed to load in a
    Ray actor arrives wrapped in a Ray error and still exits with EXIT_MODEL."""
    reason = str(exc).strip().splitlines()
    if "ModelLoadError" in str(exc):
        line = next((part for part in reason if "cannot load model" in part), reason[-1])
        print(f"granite-batch: {line.split('ModelLoadError: ')[-1]}", file=sys.stderr)
        return EXIT_MODEL
    log.debug("%s failed", what, exc_info=True)
    print(f"granite-batch: {what} failed: {type(exc).__name__}: {reason[0] if reason else ''}", file=sys.stderr)
    return EXIT_RUNTIME


def _interrupted(exc: KeyboardInterrupt) -> int:
    """Ctrl-C or SIGTERM: one line, the exit status a shell gives the signal (130, 143)."""
    from granite_batch.run.bookkeeping import interrupt_signal

    number = interrupt_signal(exc)
    print(
        f"granite-batch: interrupted ({signal.Signals(number).name}): committed rows are kept and the run's "
        "summary says so; run the same command again to finish the rest",
        file=sys.stderr,
    )
    return 128 + number


def _exit_now(code: int) -> None:
    """After an interrupt: stop the local Ray within a bound, then exit at once rather than wait
    for its tasks in the interpreter's exit handlers."""
    from granite_batch.pipeline import stop_ray

    stop_ray(timeout_s=30)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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
        return _interrupted(exc)
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
        return _could_not_finish("job", exc)
    _print_summary(result.summary, result.summary_path)
    return EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    from granite_batch.inputs.manifest import ManifestStream
    from granite_batch.inputs.plan import count_status
    from granite_batch.inputs.rows import Defaults, ManifestError
    from granite_batch.output.summary import read_summaries

    options = {"s3": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}
    runs = read_summaries(args.output, options)
    print(f"{'run':<34} {'status':<18} {'started (UTC)':<20} {'ok':>8} {'failed':>8} {'wall s':>9}")
    for run in runs:
        started = (run.get("started_at") or "")[:19].replace("T", " ")
        print(
            f"{run['run_id']:<34} {run['status']:<18} {started:<20} {run['rows_ok']:>8} "
            f"{run['rows_failed']:>8} {run['wall_s']:>9.1f}"
        )
    from granite_batch.run.lease import describe_leases

    print()
    for line in describe_leases(args.output, options):
        print(line)
    try:
        stream = ManifestStream(args.manifest, Defaults(language=args.language), options) if args.manifest else None
        # Counted file by file and bucket by bucket: never every id in memory at once (plan.py).
        status = count_status(args.output, stream, options)
    except ManifestError as exc:
        print(f"granite-batch: bad manifest: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    done = status.committed
    print(f"\nrows done: {done.rows_ok + done.rows_failed} ({done.rows_ok} ok, {done.rows_failed} failed)")
    for reason, count in done.failures_by_reason.most_common():
        print(f"  failed: {count:>6}  {reason}")
    for path in done.foreign_files:
        print(f"  skipped (not written by granite-batch): {path}")
    if status.manifest is not None:
        distinct = status.manifest["rows_in"] - status.manifest["duplicates"]
        print(f"pending: {status.manifest['rows_to_do']} of {distinct} manifest ids have no row yet")
    return EXIT_OK


def _models(names: list[str] | None) -> dict:
    """`--model` once: the job's model; repeated: its routed model list."""
    if not names:
        return {}
    return {"model": names[0], "models": []} if len(names) == 1 else {"models": [{"model": name} for name in names]}


def _cmd_tiny_model(args: argparse.Namespace) -> int:
    from granite_batch.testing.tiny_model import write_tiny_model

    path = write_tiny_model(args.directory, seed=args.seed, model_type=args.model_type)
    print(f"wrote a tiny random {args.model_type} checkpoint to {path}; use it with --model {path}")
    return EXIT_OK


def _cmd_second_pass(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from granite_batch.config import ConfigError, SecondPassOptions
    from granite_batch.models.hub import ModelLoadError

    fields = {
        "template": args.template,
        "question": args.question,
        "name": args.name,
        "model": args.model,
        "revision": args.revision,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size,
        "context_tokens": args.context_tokens,
        "model_actors": args.model_actors,
        "device": args.device,
        "dtype": args.dtype,
        "retry_failed": args.retry_failed or None,
    }
    try:
        options = SecondPassOptions.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'options'}: {e['msg']}" for e in exc.errors())
        print(f"granite-batch: invalid second pass options: {problems}", file=sys.stderr)
        return EXIT_CONFIG

    from granite_batch.config import DEFAULT_WAIT_S
    from granite_batch.run.lease import LeaseError, LeaseTerms, LeaseUnsupported
    from granite_batch.run.second_pass import run_second_pass

    storage = {"s3": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}
    lease = _lease_overrides(args)
    terms = LeaseTerms(
        mode=lease["lease"] or "auto", wait_s=DEFAULT_WAIT_S if lease["lease_wait_s"] is None else lease["lease_wait_s"]
    )
    try:
        result = run_second_pass(
            args.output, options, storage, run_id=args.run_id, progress=not args.no_progress, lease_terms=terms
        )
    except KeyboardInterrupt as exc:
        return _interrupted(exc)
    except (ConfigError, LeaseUnsupported) as exc:
        print(f"granite-batch: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LeaseError as exc:
        print(f"granite-batch: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except ModelLoadError as exc:
        print(f"granite-batch: {exc}", file=sys.stderr)
        return EXIT_MODEL
    except Exception as exc:  # the run could not finish
        return _could_not_finish("second pass", exc)
    s = result.summary
    print(
        f"\nsecond pass {s['name']} (run {s['run_id']}): {s['rows_ok']} ok, {s['rows_failed']} failed, "
        f"{s['rows_chunked']} chunked, {s['rows_already_done']} already done; skipped transcripts: "
        f"{s['skipped_failed']} failed, {s['skipped_empty']} empty; {s['wall_s']:.1f} s"
    )
    print(f"summary: {result.summary_path}")
    return EXIT_OK


def _cmd_tiny_lm(args: argparse.Namespace) -> int:
    from granite_batch.testing.tiny_lm import write_tiny_lm

    path = write_tiny_lm(args.directory, seed=args.seed)
    print(f"wrote a tiny random Granite language model to {path}; use it with second-pass --model {path}")
    return EXIT_OK


def _cmd_eval(args: argparse.Namespace) -> int:
    try:
        from granite_batch.evaluate import format_report
        from granite_batch.run.evaluation import evaluate_output
    except ImportError as exc:
        print(
            f"granite-batch: eval needs the eval extra (pip install -e '.[eval]' in a checkout): {exc}", file=sys.stderr
        )
        return EXIT_CONFIG

    storage = {"s3": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}
    try:
        report, path = evaluate_output(args.output, args.run, args.language, args.task, storage)
    except ValueError as exc:
        print(f"granite-batch: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(format_report(report))
    print(f"eval: {path}")
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for noisy in ("httpx", "urllib3", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    handler = {
        "run": _cmd_run,
        "status": _cmd_status,
        "eval": _cmd_eval,
        "tiny-model": _cmd_tiny_model,
        "second-pass": _cmd_second_pass,
        "tiny-lm": _cmd_tiny_lm,
    }[args.command]
    if args.command in ("run", "second-pass"):
        from granite_batch.run.bookkeeping import on_interrupt

        for number in (signal.SIGINT, signal.SIGTERM):  # a clean stop: committed rows stay, counted exactly
            signal.signal(number, on_interrupt)
    code = handler(args)
    if args.command in ("run", "second-pass"):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the run is over: nothing left to stop cleanly
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM):
        _exit_now(code)
    return code


if __name__ == "__main__":
    sys.exit(main())
