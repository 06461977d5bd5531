"""`granite-batch eval`: score transcripts and translations against the manifest's references."""

from __future__ import annotations

import argparse
import sys

from granite_batch.cli.common import EXIT_CONFIG, EXIT_OK, language_code


def register(commands: argparse._SubParsersAction) -> None:
    evaluate = commands.add_parser(
        "eval",
        help="score transcripts and translations against the manifest's "
        "reference column (WER/CER, BLEU/chrF); writes OUTPUT/eval/RUN_ID.json",
    )
    evaluate.add_argument("output", help="output dataset root")
    evaluate.add_argument("--run", help="score this run's rows, or 'all' for every row (default: the newest run)")
    evaluate.add_argument("--language", type=language_code, help="only rows of this recording language")
    evaluate.add_argument("--task", choices=["asr", "ast"], help="only rows of this task")
    evaluate.add_argument("--endpoint-url", help="S3-compatible endpoint")
    evaluate.set_defaults(handler=_cmd_eval)


def _cmd_eval(args: argparse.Namespace) -> int:
    try:
        from granite_batch.evaluate import format_report
        from granite_batch.run.evaluation import evaluate_output
        from granite_batch.storage import OutputRoot
    except ImportError as exc:
        print(
            f"granite-batch: eval needs the eval extra (pip install -e '.[eval]' in a checkout): {exc}", file=sys.stderr
        )
        return EXIT_CONFIG

    storage = {"s3": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}
    try:
        report, path = evaluate_output(OutputRoot(args.output, storage), args.run, args.language, args.task)
    except ValueError as exc:
        print(f"granite-batch: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    print(format_report(report))
    print(f"eval: {path}")
    return EXIT_OK
