"""Scheduled re-runs: done ids are skipped, failed ones redone on request, a killed driver loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from conftest import REPO, SAMPLES, run_cli, write_jsonl


def output_rows(root: Path) -> list[dict]:
    return pads.dataset(root / "transcripts", format="parquet", partitioning="hive").to_table().to_pylist()


def summaries(root: Path) -> list[dict]:
    """Run summaries, oldest first."""
    runs = [json.loads(p.read_text()) for p in (root / "runs").glob("*.json")]
    return sorted(runs, key=lambda run: run["started_at"])


def base_args(manifest: Path, output: Path, model: Path) -> list[str]:
    return ["run", "--manifest", str(manifest), "--output", str(output), "--model", str(model),
            "--max-new-tokens", "4", "--no-progress"]


def test_second_run_processes_nothing_and_retry_failed_redoes_error_rows(tmp_path, tiny_model_dir):
    broken = tmp_path / "later.wav"
    rows = [{"audio": str(SAMPLES / "pt_praia.wav"), "language": "pt"},
            {"audio": str(SAMPLES / "fr_gare.mp3"), "language": "fr"},
            {"audio": str(broken), "language": "en", "id": "fixed-later"}]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    output = tmp_path / "out"

    first = run_cli(base_args(manifest, output, tiny_model_dir))
    assert first.returncode == 0, first.stderr[-2000:]
    assert len(output_rows(output)) == 3

    second = run_cli(base_args(manifest, output, tiny_model_dir))
    assert second.returncode == 0, second.stderr[-2000:]
    assert len(output_rows(output)) == 3
    last = summaries(output)[-1]
    assert last["rows_already_done"] == 3 and last["rows_written"] == 0

    status = run_cli(["status", str(output), "--manifest", str(manifest)])
    assert status.returncode == 0, status.stderr
    assert "rows done: 3 (2 ok, 1 failed)" in status.stdout and "pending: 0 of 3" in status.stdout
    assert "not found" in status.stdout

    broken.write_bytes((SAMPLES / "pt_praia.wav").read_bytes())  # the recording turns up
    third = run_cli(base_args(manifest, output, tiny_model_dir) + ["--retry-failed"])
    assert third.returncode == 0, third.stderr[-2000:]
    rows = output_rows(output)
    assert sorted(r["id"] for r in rows) == sorted({r["id"] for r in rows}) and len(rows) == 3
    assert all(r["error"] is None for r in rows)


def test_driver_killed_mid_run_then_rerun_gives_exactly_one_row_per_id(tmp_path, tiny_model_dir):
    names = ["en_weather.flac", "fr_gare.mp3", "de_bibliothek.ogg", "es_mercado.m4a", "pt_praia.wav"]
    rows = [{"audio": str(SAMPLES / name), "language": name[:2], "id": f"row-{i:03d}"}
            for i in range(40) for name in [names[i % len(names)]]]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    output = tmp_path / "out"
    config = tmp_path / "job.yaml"
    # Small files and batches so that some rows are committed long before the run ends; a short lease
    # expiry, so the rerun takes over the killed run's lease after 2 s instead of 10 min.
    config.write_text("rows_per_file: 2\nbatch_size: 2\ndecode_batch_size: 1\ncommit_interval_s: 1\n"
                      "lease_expiry_s: 2\n")
    args = base_args(manifest, output, tiny_model_dir) + ["--config", str(config)]

    process = subprocess.Popen([sys.executable, "-m", "granite_batch.cli", *args], cwd=REPO,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    transcripts = output / "transcripts"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None:
        if transcripts.exists() and len(list(transcripts.glob("*/*.parquet"))) >= 2:
            break
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be killed; make it longer"
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray it started
    process.wait()
    written = output_rows(output)
    assert 0 < len(written) < 40
    assert summaries(output)[0]["status"] == "running"  # the killed run's summary shows how far it got

    again = run_cli(args)
    assert again.returncode == 0, again.stderr[-2000:]
    assert f"taking over the stale lease on {output}/transcripts from run {summaries(output)[0]['run_id']}" in again.stderr
    final = output_rows(output)
    ids = [r["id"] for r in final]
    assert len(ids) == len(set(ids)) == 40
    assert summaries(output)[-1]["rows_already_done"] == len(written)
    assert summaries(output)[-1]["rows_written"] == 40 - len(written)
