"""`granite-batch status`: the runs of an output root, and what is done, failed and pending."""

from __future__ import annotations

import argparse
import json
import sys

from granite_batch.cli.common import EXIT_CONFIG, EXIT_OK, language_code

# What `status --json` keeps of each run summary: enough for a scheduler to read a run's outcome.
RUN_KEYS = (
    "run_id",
    "status",
    "error",
    "signal",
    "started_at",
    "finished_at",
    "rows_to_do",
    "rows_ok",
    "rows_failed",
    "rows_incomplete",
    "failures_by_reason",
    "audio_hours",
    "wall_s",
    "rtfx",
)


def register(commands: argparse._SubParsersAction) -> None:
    status = commands.add_parser("status", help="list the runs of an output root and what is done, failed, pending")
    status.add_argument("output", help="output dataset root")
    status.add_argument("--manifest", help="also count the manifest's ids that have no row yet")
    status.add_argument(
        "--language", type=language_code, default="en", help="the job's --language, for manifest ids (default en)"
    )
    status.add_argument("--endpoint-url", help="S3-compatible endpoint")
    status.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object (runs oldest first with their status and counts, the lease, rows done, "
        "pending) for schedulers and scripts",
    )
    status.add_argument("--run-id", help="only this run (with --json: `runs` holds it alone, or nothing)")
    status.set_defaults(handler=_cmd_status)


def _cmd_status(args: argparse.Namespace) -> int:
    from granite_batch.inputs.manifest import ManifestStream
    from granite_batch.inputs.plan import count_status
    from granite_batch.inputs.rows import Defaults, ManifestError
    from granite_batch.output.summary import read_summaries
    from granite_batch.run.lease import describe_leases, read_holder
    from granite_batch.schema import TRANSCRIPTS_DIR
    from granite_batch.storage import OutputRoot

    options = {"s3": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}
    output = OutputRoot(args.output, options)
    if not output.fs.exists(output.path):  # a typo in the root must not read as "nothing done yet"
        print(f"granite-batch: {args.output}: no such output root", file=sys.stderr)
        return EXIT_CONFIG
    runs = [run for run in read_summaries(output) if args.run_id in (None, run["run_id"])]
    holder = read_holder(output, TRANSCRIPTS_DIR)

    def shown(run: dict) -> str:
        """`running` only while the run holds a live lease; without lease records (lease: none) as written."""
        if run["status"] != "running" or holder is None:
            return run["status"]
        age = holder.renewed_age_s()
        live = holder.run_id == run["run_id"] and not holder.released and age is not None and age <= holder.expiry_s
        return "running" if live else "died"

    try:
        stream = ManifestStream(args.manifest, Defaults(language=args.language), options) if args.manifest else None
        # Counted file by file and bucket by bucket: never every id in memory at once (plan.py).
        status = count_status(output, stream)
    except ManifestError as exc:
        print(f"granite-batch: bad manifest: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    done = status.committed
    if args.json:
        report = {
            "output": args.output,
            "runs": [{**{key: run.get(key) for key in RUN_KEYS}, "status": shown(run)} for run in runs],
            "lease": None
            if holder is None
            else {
                "run_id": holder.run_id,
                "host": holder.host,
                "pid": holder.pid,
                "renewed_at": holder.renewed_at,
                "expiry_s": holder.expiry_s,
            },
            "rows": {
                "ok": done.rows_ok,
                "failed": done.rows_failed,
                "failures_by_reason": dict(done.failures_by_reason.most_common()),
            },
            "pending": None if status.manifest is None else status.manifest["rows_to_do"],
        }
        print(json.dumps(report, indent=2))
        return EXIT_OK
    print(f"{'run':<34} {'status':<18} {'started (UTC)':<20} {'ok':>8} {'failed':>8} {'wall s':>9}")
    for run in runs:
        started = (run.get("started_at") or "")[:19].replace("T", " ")
        print(
            f"{run['run_id']:<34} {shown(run):<18} {started:<20} {run['rows_ok']:>8} "
            f"{run['rows_failed']:>8} {run['wall_s']:>9.1f}"
        )
    print()
    for line in describe_leases(output):
        print(line)
    print(f"\nrows done: {done.rows_ok + done.rows_failed} ({done.rows_ok} ok, {done.rows_failed} failed)")
    for reason, count in done.failures_by_reason.most_common():
        print(f"  failed: {count:>6}  {reason}")
    for path in done.foreign_files:
        print(f"  skipped (not written by granite-batch): {path}")
    if status.manifest is not None:
        distinct = status.manifest["rows_in"] - status.manifest["duplicates"]
        print(f"pending: {status.manifest['rows_to_do']} of {distinct} manifest ids have no row yet")
    return EXIT_OK
