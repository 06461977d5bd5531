"""`ray job submit` to a real Ray cluster on loopback, as users submit the job."""

from __future__ import annotations

import json
import subprocess

import pyarrow.dataset as pads

from conftest import RAY, REPO, SAMPLES


def test_ray_job_submit_end_to_end(ray_cluster, tiny_model_dir, tmp_path):
    output = tmp_path / "out"
    # The README's command, with the tiny checkpoint and local paths.
    command = [RAY, "job", "submit", "--address", ray_cluster["address"], "--working-dir", ".",
               "--runtime-env", "cluster/runtime_env.yaml", "--",
               "python", "-m", "granite_batch.cli", "run", "--manifest", str(SAMPLES / "manifest.jsonl"),
               "--output", str(output), "--model", str(tiny_model_dir), "--max-new-tokens", "4",
               "--no-progress", "--run-id", "submitted"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=ray_cluster["env"], timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()

    rows = pads.dataset(output / "transcripts", format="parquet", partitioning="hive").to_table().to_pylist()
    assert len(rows) == len({r["id"] for r in rows}) == 8
    assert all(r["error"] is None and r["run_id"] == "submitted" for r in rows)
    summary = json.loads((output / "runs" / "submitted.json").read_text())
    assert summary["status"] == "succeeded" and summary["rows_ok"] == 8
