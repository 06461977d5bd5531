"""Manifest reading and re-run planning at scale, against plain pyarrow on the same files.

    PYTHONPATH=jobs .venv/bin/python benchmarks/bench_manifest.py --rows 1000000 3000000

For each size it writes a JSON Lines manifest of N rows (each with its own id, like a nightly
archive) and an output root in which every id is already done, then runs each case in its own
process and reports wall time and peak RSS (`ru_maxrss` of that process):

    read_plain   pyarrow.json.read_json of the whole manifest
    read_ours    manifest.ManifestStream over it (normalised blocks, none held)
    plan_plain   read_json + the output's `id` column read with pyarrow.dataset + `is_in`
    plan_ours    plan.prepare_plan + plan_bucket over every bucket (what `granite-batch run` plans)

"per extra row" is the difference between the two sizes divided by the difference in rows: what
each further manifest row costs, with the fixed cost of the process taken out.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = ("read_plain", "read_ours", "plan_plain", "plan_ours")


def write_inputs(folder: Path, rows: int) -> tuple[Path, Path]:
    """A manifest of `rows` rows and an output root holding a successful row for each of its ids."""
    import pyarrow as pa

    from granite_batch.output.writer import TranscriptWriter
    from granite_batch.schema import SEGMENT_TYPE, transcript_schema
    from granite_batch.storage import OutputRoot

    manifest = folder / "manifest.jsonl"
    languages = ["en", "fr", "de", "es", "pt", "ja"]
    with open(manifest, "w", encoding="utf-8") as handle:
        for i in range(rows):
            language = languages[i % len(languages)]
            handle.write(
                json.dumps(
                    {
                        "id": f"rec-{i:010d}",
                        "audio": f"s3://archive/{language}/2026/{i // 1000:06d}/{i:010d}.flac",
                        "language": language,
                        "reference": "the weather today is sunny with a light breeze",
                        "speaker": f"speaker-{i % 97}",
                    }
                )
                + "\n"
            )
    output = folder / "out"
    schema = transcript_schema(pa.schema([("reference", pa.string()), ("speaker", pa.string())]))
    writer = TranscriptWriter(OutputRoot(str(output)), "bench", schema, rows_per_file=200_000)
    step = 500_000
    for start in range(0, rows, step):
        n = min(step, rows - start)
        ids = [f"rec-{i:010d}" for i in range(start, start + n)]
        writer.write(
            pa.table(
                {
                    "id": ids,
                    "audio": [f"s3://archive/x/{i}.flac" for i in ids],
                    "language": ["en"] * n,
                    "task": ["asr"] * n,
                    "target_language": pa.nulls(n, pa.string()),
                    "text": ["sunny"] * n,
                    "segments": pa.nulls(n, pa.list_(SEGMENT_TYPE)),
                    "duration_s": [1.0] * n,
                    "error": pa.nulls(n, pa.string()),
                    "model": ["m"] * n,
                    "model_revision": ["r"] * n,
                    "run_id": ["bench"] * n,
                    "reference": ["x"] * n,
                    "speaker": ["s"] * n,
                }
            )
        )
    writer.close()
    return manifest, output


def run_case(case: str, manifest: Path, output: Path) -> dict:
    """One case in this process: its figures, wall time and this process's peak RSS."""
    import pyarrow.compute as pc
    import pyarrow.dataset as pads
    import pyarrow.json as pajson

    from granite_batch.inputs.manifest import ManifestStream
    from granite_batch.inputs.plan import plan_bucket, prepare_plan, sum_counts
    from granite_batch.inputs.rows import Defaults
    from granite_batch.storage import OutputRoot

    start = time.perf_counter()
    result: dict = {}
    if case == "read_plain":
        result["rows"] = pajson.read_json(manifest).num_rows
    elif case == "read_ours":
        result["rows"] = sum(block.num_rows for block in ManifestStream(str(manifest), Defaults()))
    elif case == "plan_plain":
        rows = pajson.read_json(manifest)
        done = pads.dataset(output / "transcripts", format="parquet", partitioning="hive").to_table(columns=["id"])
        todo = rows.filter(pc.invert(pc.is_in(rows.column("id"), value_set=done.column("id").combine_chunks())))
        result.update(rows=rows.num_rows, rows_to_do=todo.num_rows)
    elif case == "plan_ours":
        with tempfile.TemporaryDirectory(dir=output.parent) as folder:
            layout = prepare_plan(ManifestStream(str(manifest), Defaults()), OutputRoot(str(output)), folder)
            counts = sum_counts([plan_bucket(layout, b)[1] for b in range(layout.buckets)])
            plan_files = [p for p in Path(folder).rglob("*.arrow")]
            result["plan_mb"] = sum(p.stat().st_size for p in plan_files) / 2**20
            result["plan_files"] = len(plan_files)
        result.update(rows=counts["rows_in"], rows_to_do=counts["rows_to_do"], buckets=layout.buckets)
    else:
        raise SystemExit(f"unknown case {case}")
    result["wall_s"] = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_s"] = usage.ru_utime + usage.ru_stime  # every thread's; steadier than wall on a busy machine
    result["peak_rss_mb"] = usage.ru_maxrss / 1024
    return result


def measure(case: str, manifest: Path, output: Path, repeat: int) -> dict:
    """Run one case in fresh processes, so each peak RSS is its own; the fastest of `repeat` runs
    (the machine is shared, so slower runs measure the neighbours)."""
    results = []
    for _ in range(repeat):
        completed = subprocess.run(
            [sys.executable, __file__, "--case", case, "--manifest", str(manifest), "--output", str(output)],
            capture_output=True,
            text=True,
            check=True,
        )
        results.append(json.loads(completed.stdout.strip().splitlines()[-1]))
    return min(results, key=lambda r: r["wall_s"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[1_000_000, 3_000_000])
    parser.add_argument("--repeat", type=int, default=2, help="runs per case; the fastest is reported")
    parser.add_argument("--work", help="folder for the generated files (default: a temporary one)")
    parser.add_argument("--case", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", help=argparse.SUPPRESS)
    parser.add_argument("--output", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, Path(args.manifest), Path(args.output))))
        return

    with tempfile.TemporaryDirectory(dir=args.work) as work:
        figures: dict[int, dict[str, dict]] = {}
        for rows in args.rows:
            folder = Path(work) / str(rows)
            folder.mkdir()
            manifest, output = write_inputs(folder, rows)
            figures[rows] = {case: measure(case, manifest, output, args.repeat) for case in CASES}
            for case, result in figures[rows].items():
                print(
                    f"{rows:>10,} rows  {case:<11} {result['wall_s']:7.2f} s wall  {result['cpu_s']:7.2f} s CPU  "
                    f"{result['peak_rss_mb']:8.0f} MB peak RSS"
                    + (
                        f"  ({result['buckets']} buckets, {result['plan_files']} plan files, "
                        f"{result['plan_mb']:.0f} MB)"
                        if "buckets" in result
                        else ""
                    ),
                    flush=True,
                )
                assert result["rows"] == rows and result.get("rows_to_do", 0) == 0, result
        if len(args.rows) >= 2:
            small, big = args.rows[0], args.rows[-1]
            extra = big - small
            print(f"\nper extra row between {small:,} and {big:,} rows:")
            for case in CASES:
                a, b = figures[small][case], figures[big][case]
                print(
                    f"  {case:<11} {(b['wall_s'] - a['wall_s']) / extra * 1e6:6.2f} us wall  "
                    f"{(b['cpu_s'] - a['cpu_s']) / extra * 1e6:6.2f} us CPU  "
                    f"{(b['peak_rss_mb'] - a['peak_rss_mb']) * 2**20 / extra:7.0f} bytes"
                )


if __name__ == "__main__":
    main()
