"""Benchmark: what archive upkeep costs on local files: redo planning, rows replaced in place, compaction,
and the same redo as Delta merges.

    PYTHONPATH=jobs python benchmarks/bench_archive.py [--rows 100000] [--files 50] [--redo-fraction 0.2]

Builds an archive of `--rows` transcript rows (each with one segment of 60 characters) in `--files`
Parquet files of one partition, as a nightly job leaves it, then times:

- planning a redo of `--redo-fraction` of the rows (`model == old`) against a manifest of every id;
- committing the new rows of those ids in commits of `--rows-per-commit` (each commit rewrites every
  committed file holding one of its ids: output/replace.py);
- `compact` of the archive into one file;
- the same rows written to a Delta table and the redo committed as merges of the same size.

Not a test: it only reports. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from granite_batch.inputs.manifest import ManifestStream
from granite_batch.inputs.plan import plan_counts, prepare_plan
from granite_batch.inputs.redo import parse_selections
from granite_batch.inputs.rows import Defaults
from granite_batch.output.compact import compact_dataset
from granite_batch.output.replace import Replacements
from granite_batch.output.writer import TranscriptWriter
from granite_batch.schema import SEGMENT_TYPE, transcript_schema
from granite_batch.storage import OutputRoot


def rows(ids: list[str], model: str | list[str]) -> pa.Table:
    n = len(ids)
    segments = [[{"start": 0.0, "end": 4.0, "text": "x" * 60, "avg_logprob": -0.2}]] * n
    return pa.table(
        {
            "id": ids,
            "audio": [f"s3://archive/{i}.flac" for i in ids],
            "language": ["en"] * n,
            "task": ["asr"] * n,
            "text": ["x" * 60] * n,
            "segments": pa.array(segments, pa.list_(SEGMENT_TYPE)),
            "duration_s": [4.0] * n,
            "model": [model] * n if isinstance(model, str) else model,
            "run_id": ["r"] * n,
        }
    )


def timed(function):
    start = time.perf_counter()
    result = function()
    return result, round(time.perf_counter() - start, 3)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--files", type=int, default=50)
    parser.add_argument("--redo-fraction", type=float, default=0.2)
    parser.add_argument("--rows-per-commit", type=int, default=5_000)
    args = parser.parse_args()
    figures: dict = {"rows": args.rows, "files": args.files, "redo_fraction": args.redo_fraction}
    figures["machine"] = {"cpus": os.cpu_count(), "load_1m": os.getloadavg()[0], "python": platform.python_version()}
    ids = [f"id-{i:09d}" for i in range(args.rows)]
    rng = np.random.default_rng(0)
    chosen = sorted(rng.choice(args.rows, int(args.rows * args.redo_fraction), replace=False).tolist())
    keep = set(chosen)
    # The rows to redo were made by the old model; the others already by the new one.
    models = ["old" if i in keep else "new" for i in range(args.rows)]
    with tempfile.TemporaryDirectory(prefix="bench-archive-") as folder:
        output = str(Path(folder) / "out")
        per_file = -(-args.rows // args.files)
        for n in range(args.files):  # one night each
            writer = TranscriptWriter(OutputRoot(output), f"night{n:04d}", transcript_schema())
            writer.write(rows(ids[n * per_file : (n + 1) * per_file], models[n * per_file : (n + 1) * per_file]))
            writer.close()
        manifest = Path(folder) / "m.jsonl"
        manifest.write_text("".join(json.dumps({"id": i, "audio": f"s3://archive/{i}.flac"}) + "\n" for i in ids))
        replacements = Replacements()
        selections = parse_selections(["model == old"])

        def plan():
            stream = ManifestStream(str(manifest), Defaults())
            layout = prepare_plan(
                stream, OutputRoot(output), str(Path(folder) / "plan"), redo=selections, replacements=replacements
            )
            return plan_counts(layout)

        counts, figures["plan_s"] = timed(plan)
        figures["rows_redone"] = counts["rows_redone"]

        def replace():
            writer = TranscriptWriter(
                OutputRoot(output),
                "redo",
                transcript_schema(),
                rows_per_file=args.rows_per_commit,
                replacements=replacements,
            )
            redo_ids = [ids[i] for i in chosen]
            for start in range(0, len(redo_ids), 1000):
                writer.write(rows(redo_ids[start : start + 1000], "new"))
            writer.close()
            return len(writer.committed)

        _, figures["replace_s"] = timed(replace)
        figures["commits"] = -(-len(chosen) // args.rows_per_commit)
        figures["rows_replaced"] = replacements.rows_replaced
        result, figures["compact_s"] = timed(
            lambda: compact_dataset(OutputRoot(output), "compact-bench", target_mb=1024)
        )
        figures["files_after_compact"] = result.files_after

        try:
            from granite_batch.output.delta import DeltaWriter
        except ImportError:
            figures["delta"] = "skipped: pip install -e '.[delta]'"
        else:
            delta = str(Path(folder) / "delta")

            def delta_write():
                writer = DeltaWriter(OutputRoot(delta), "nights", transcript_schema(), rows_per_file=per_file)
                for n in range(args.files):
                    writer.write(
                        rows(ids[n * per_file : (n + 1) * per_file], models[n * per_file : (n + 1) * per_file])
                    )
                writer.close()

            _, figures["delta_initial_s"] = timed(delta_write)

            def delta_redo():
                writer = DeltaWriter(OutputRoot(delta), "redo", transcript_schema(), rows_per_file=args.rows_per_commit)
                redo_ids = [ids[i] for i in chosen]
                for start in range(0, len(redo_ids), 1000):
                    writer.write(rows(redo_ids[start : start + 1000], "new"))
                writer.close()
                return writer.rows_replaced

            figures["delta_rows_replaced"], figures["delta_redo_s"] = timed(delta_redo)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
