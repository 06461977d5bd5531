"""`granite-batch second-pass`: a Granite language model over the transcripts of an output root."""

from __future__ import annotations

import argparse
import sys

from granite_batch.cli.common import EXIT_CONFIG, EXIT_OK, exit_code, lease_arguments, lease_overrides


def register(commands: argparse._SubParsersAction) -> None:
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
    lease_arguments(second)
    second.add_argument("--endpoint-url", help="S3-compatible endpoint")
    second.add_argument("--no-progress", action="store_true", help="no progress bars")
    second.add_argument("-v", "--verbose", action="store_true")

    second.set_defaults(handler=_cmd_second_pass)


def _cmd_second_pass(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from granite_batch.config import SecondPassOptions

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
    from granite_batch.run.lease import LeaseTerms
    from granite_batch.run.second_pass import run_second_pass
    from granite_batch.storage import OutputRoot

    storage = {"s3": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}
    lease = lease_overrides(args)
    terms = LeaseTerms(
        mode=lease["lease"] or "auto", wait_s=DEFAULT_WAIT_S if lease["lease_wait_s"] is None else lease["lease_wait_s"]
    )
    try:
        output = OutputRoot(args.output, storage)
        result = run_second_pass(output, options, run_id=args.run_id, progress=not args.no_progress, lease_terms=terms)
    except (Exception, KeyboardInterrupt) as exc:  # exit codes: cli/common.py
        return exit_code(exc, "second pass")
    s = result.summary
    print(
        f"\nsecond pass {s['name']} (run {s['run_id']}): {s['rows_ok']} ok, {s['rows_failed']} failed, "
        f"{s['rows_chunked']} chunked, {s['rows_already_done']} already done; skipped transcripts: "
        f"{s['skipped_failed']} failed, {s['skipped_empty']} empty; {s['wall_s']:.1f} s"
    )
    print(f"summary: {result.summary_path}")
    return EXIT_OK
