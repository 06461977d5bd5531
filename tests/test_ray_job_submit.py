"""`ray job submit` to a real Ray cluster on loopback, as users submit the job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pyarrow.dataset as pads
import pytest

from conftest import REPO, SAMPLES, free_port

RAY = str(Path(os.sys.executable).with_name("ray"))


@pytest.fixture
def ray_cluster():
    """`ray start --head` with the dashboard (job submission) on 127.0.0.1, in its own temp dir."""
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay short
    port, dashboard = free_port(), free_port()
    # The CLI sends the dashboard token only when asked. PATH: on this one-machine "cluster" the
    # virtualenv plays the role of the image, so the job's `python` must be the virtualenv's.
    env = {**os.environ, "RAY_AUTH_MODE": "token",
           "PATH": f"{Path(os.sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    subprocess.run(
        [RAY, "start", "--head", f"--port={port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
         "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
         f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        check=True, capture_output=True, env=env, timeout=180,
    )
    try:
        yield {"address": f"http://127.0.0.1:{dashboard}", "env": env}
    finally:
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


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
