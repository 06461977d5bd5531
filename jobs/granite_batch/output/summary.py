"""The run summary: counts gathered while rows are written, and the JSON per run."""

from __future__ import annotations

import json
import posixpath
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from granite_batch.schema import RUNS_DIR, STAGING_DIR, error_reason
from granite_batch.storage import OutputRoot, write_json


def read_summaries(output: OutputRoot) -> list[dict]:
    """Every run summary under the output root, oldest first."""
    fs, folder = output.fs, output.join(RUNS_DIR)
    if not fs.exists(folder):
        return []
    summaries = []
    for path in sorted(fs.glob(posixpath.join(folder, "*.json"))):
        with fs.open(path, "r") as handle:
            summaries.append(json.load(handle))
    return sorted(summaries, key=lambda s: s.get("started_at", ""))


@dataclass
class RunStats:
    """Counts over the rows a run wrote, for the summary and the progress line."""

    rows_written: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    audio_s: float = 0.0
    failures_by_reason: Counter = field(default_factory=Counter)
    rows_by_language: Counter = field(default_factory=Counter)
    decoding: dict = field(default_factory=dict)  # language -> Counter of what decided each row

    def add(self, table: pa.Table) -> None:
        errors = table.column("error").to_pylist()
        durations = table.column("duration_s").to_pylist()
        self.rows_written += table.num_rows
        for error, duration in zip(errors, durations):
            if error is None:
                self.rows_ok += 1
            else:
                self.rows_failed += 1
                self.failures_by_reason[error_reason(error)] += 1
            self.audio_s += duration or 0.0
        self.rows_by_language.update(table.column("language").to_pylist())
        if "decoded_by" in table.column_names:
            for language, decided in zip(table.column("language").to_pylist(), table.column("decoded_by").to_pylist()):
                if decided is not None:
                    self.decoding.setdefault(language, Counter())[decided] += 1


def write_summary(output: OutputRoot, run_id: str, summary: dict, runs_dir: str = RUNS_DIR) -> str:
    """Write `<runs_dir>/<run_id>.json` under the output root; return its path."""
    return write_json(output, posixpath.join(runs_dir, f"{run_id}.json"), summary)


def batch_counts(table: pa.Table) -> dict[str, float]:
    """What a batch of transcript rows adds to the run's metrics: rows ok and failed, audio seconds,
    segments (pipeline.JobMetrics)."""
    failed = table.num_rows - table.column("error").null_count
    segments = pc.sum(pc.list_value_length(table.column("segments"))).as_py() or 0
    return {
        "rows_ok": table.num_rows - failed,
        "rows_failed": failed,
        "audio_s": float(pc.sum(table.column("duration_s")).as_py() or 0.0),
        "segments": segments,
    }


def reap_dead_runs(output: OutputRoot, live_run_id: str) -> list[str]:
    """The runs whose summary still says `running` while run `live_run_id` holds the transcripts'
    lease: they died (killed, or their machine lost) before writing a final status. Their staging
    folder is removed and their summary says `died`; returns their ids. Only a lease holder may
    call this (with `lease: none` another run may really be running)."""
    fs = output.fs
    dead = []
    for summary in read_summaries(output):
        run_id = summary.get("run_id")
        if summary.get("status") != "running" or not run_id or run_id == live_run_id:
            continue
        staging = output.join(STAGING_DIR, run_id)
        if fs.exists(staging):
            fs.rm(staging, recursive=True)
        ended = {**summary, "status": "died", "error": f"stopped without a final status; run {live_run_id} found it"}
        write_summary(output, run_id, ended)
        dead.append(run_id)
    return dead
