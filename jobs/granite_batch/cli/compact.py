"""`granite-batch compact`: merge the small files of each language partition into larger ones."""

from __future__ import annotations

import argparse
import sys

from granite_batch.cli.common import EXIT_CONFIG, EXIT_OK, EXIT_RUNTIME, lease_arguments, lease_overrides


def register(commands: argparse._SubParsersAction) -> None:
    compact = commands.add_parser(
        "compact",
        help="merge the small Parquet files of each language partition into files of a target size (rows unchanged)",
    )
    compact.add_argument("output", help="output dataset root")
    compact.add_argument(
        "--target-size-mb", type=float, default=256.0, help="size of the merged files, in MB of Parquet (default 256)"
    )
    compact.add_argument("--endpoint-url", help="S3-compatible endpoint")
    lease_arguments(compact)
    compact.add_argument("-v", "--verbose", action="store_true")
    compact.set_defaults(handler=_cmd_compact)


def _cmd_compact(args: argparse.Namespace) -> int:
    from granite_batch.config import DEFAULT_EXPIRY_S, DEFAULT_WAIT_S
    from granite_batch.run.compaction import compact_output
    from granite_batch.run.lease import LeaseError, LeaseTerms, LeaseUnsupported

    if args.target_size_mb <= 0:
        print("granite-batch: --target-size-mb must be positive", file=sys.stderr)
        return EXIT_CONFIG
    options = {"s3": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}
    lease = lease_overrides(args)
    terms = LeaseTerms(
        lease["lease"] or "auto",
        DEFAULT_EXPIRY_S,
        DEFAULT_WAIT_S if lease["lease_wait_s"] is None else lease["lease_wait_s"],
    )
    from granite_batch.output.delta import is_delta, optimize
    from granite_batch.storage import OutputRoot

    output = OutputRoot(args.output, options)
    if is_delta(output):  # the format's own compaction: one commit, readers see one version
        metrics = optimize(output, args.target_size_mb)
        print(
            f"optimized the Delta table {args.output}/transcripts: {metrics['numFilesRemoved']} files -> "
            f"{metrics['numFilesAdded']} (old files stay for older versions until a vacuum)"
        )
        return EXIT_OK
    try:
        result = compact_output(output, args.target_size_mb, terms)
    except LeaseUnsupported as exc:
        print(f"granite-batch: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except LeaseError as exc:
        print(f"granite-batch: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    merged = ", ".join(f"{language} {count}" for language, count in sorted(result.merged.items())) or "none"
    print(
        f"compacted {args.output}: {result.files_before} files -> {result.files_after} "
        f"({result.rows} rows merged; files merged per language: {merged})"
    )
    for reason in result.skipped:
        print(f"  left as they are: {reason}")
    return EXIT_OK
