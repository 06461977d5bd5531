"""Ctrl-C and SIGTERM stop a run cleanly: committed rows stay, the summary says `interrupted`, the exit
status is the shell's (130, 143), nothing is left in staging, and the next run finishes the rest."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from conftest import REPO, SAMPLES, run_cli, write_jsonl

NAMES = ["en_weather.flac", "fr_gare.mp3", "de_bibliothek.ogg", "es_mercado.m4a", "pt_praia.wav"]


def ids_written(output: Path) -> list[str]:
    folder = output / "transcripts"
    if not folder.exists():
        return []
    return pads.dataset(folder, format="parquet", partitioning="hive").to_table(columns=["id"]).column("id").to_pylist()


@pytest.mark.parametrize(
    "number", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)], ids=["SIGTERM", "SIGINT"]
)
def test_an_interrupted_run_keeps_what_it_committed_and_the_next_run_finishes(tmp_path, tiny_model_dir, number):
    rows = [
        {"audio": str(SAMPLES / NAMES[i % len(NAMES)]), "language": NAMES[i % len(NAMES)][:2], "id": f"row-{i:03d}"}
        for i in range(40)
    ]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    output = tmp_path / "out"
    config = tmp_path / "job.yaml"
    # Small files and batches, so some rows are committed long before the run would end.
    config.write_text("rows_per_file: 2\nbatch_size: 2\ndecode_batch_size: 1\ncommit_interval_s: 1\n")
    args = ["run", "--manifest", str(manifest), "--output", str(output), "--model", str(tiny_model_dir)]
    args += ["--max-new-tokens", "4", "--no-progress", "--config", str(config)]
    process = subprocess.Popen(
        [sys.executable, "-m", "granite_batch.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and process.poll() is None and len(ids_written(output)) < 2:
        time.sleep(0.2)
    assert process.poll() is None, "the run ended before it could be interrupted; make it longer"
    process.send_signal(number)  # to the driver alone, as a scheduler or a terminal would
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == 128 + number, stderr[-3000:]
    assert "Traceback" not in stderr and f"interrupted ({signal.Signals(number).name})" in stderr
    summary = json.loads(next((output / "runs").glob("*.json")).read_text())
    assert summary["status"] == "interrupted" and summary["signal"] == signal.Signals(number).name
    written = ids_written(output)
    assert 0 < len(written) < 40 and len(written) == len(set(written)) == summary["rows_written"]
    assert not (output / "_staging" / summary["run_id"]).exists()  # no plan, no half file left behind

    again = run_cli(args)
    assert again.returncode == 0, again.stderr[-2000:]
    final = ids_written(output)
    assert len(final) == len(set(final)) == 40
