"""`granite-batch gc`: list, and remove, what dead runs left in an output root."""

from __future__ import annotations

import argparse
import re

from granite_batch.cli.common import EXIT_CONFIG, EXIT_OK

UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration_s(text: str) -> float:
    """`90s`, `30m`, `12h`, `7d` or a number of seconds."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if match is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration: give e.g. 90s, 30m, 12h or 7d")
    return float(match.group(1)) * UNITS_S[match.group(2) or "s"]


def register(commands: argparse._SubParsersAction) -> None:
    gc = commands.add_parser(
        "gc",
        help="remove what dead runs left in an output root (their staging and plan files); never a live run's",
    )
    gc.add_argument("output", help="output dataset root")
    gc.add_argument(
        "--older-than",
        type=duration_s,
        default=duration_s("1h"),
        metavar="AGE",
        help="only folders unchanged for this long (90s, 30m, 12h, 7d; default 1h); a run that holds "
        "the output's lease is kept whatever its age",
    )
    gc.add_argument("--dry-run", action="store_true", help="list what would be removed; remove nothing")
    gc.add_argument("--endpoint-url", help="S3-compatible endpoint")
    gc.set_defaults(handler=_cmd_gc)


def _cmd_gc(args: argparse.Namespace) -> int:
    from granite_batch.run.gc import find_leftovers, remove_leftovers
    from granite_batch.storage import OutputRoot

    options = {"s3": {"endpoint_url": args.endpoint_url}} if args.endpoint_url else {}
    output = OutputRoot(args.output, options)
    if not output.fs.isdir(output.path):
        print(f"granite-batch: no output at {args.output}")
        return EXIT_CONFIG
    leftovers = find_leftovers(output, args.older_than)
    for item in leftovers:
        idle = "?" if item.idle_s is None else f"{item.idle_s / 3600:.1f} h"
        verb = ("would remove" if args.dry_run else "remove") if item.removable else "keep"
        print(f"{verb:<13} {item.path}  {item.files} files, {item.bytes / 1e6:.1f} MB, idle {idle}: {item.why}")
    removable = [item for item in leftovers if item.removable]
    total_mb = sum(item.bytes for item in removable) / 1e6
    if args.dry_run:
        print(f"{len(removable)} folders of dead runs ({total_mb:.1f} MB) would be removed (dry run)")
        return EXIT_OK
    removed = remove_leftovers(output, leftovers)
    print(f"removed {len(removable)} folders of dead runs ({removed / 1e6:.1f} MB)")
    return EXIT_OK
