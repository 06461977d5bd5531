"""`ray job submit` to a real Ray cluster on loopback, as users submit the job."""

from __future__ import annotations

import json
import subprocess
import time

import pyarrow.dataset as pads
import pytest

from conftest import RAY, REPO, SAMPLES


def _submit(command: list[str], env: dict) -> subprocess.CompletedProcess:
    """Submit as a user would, retrying what Ray itself says to retry: the dashboard can answer before
    the head node's job agent has registered, and then waits only 10 s for it. Nothing was submitted by
    a refused attempt, so trying again cannot run the job twice."""
    for _attempt in range(6):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
        if result.returncode == 0 or "No available agent to submit job" not in result.stdout + result.stderr:
            return result
        time.sleep(5)
    return result


def test_ray_job_submit_end_to_end(ray_cluster, tiny_model_dir, tmp_path):
    output = tmp_path / "out"
    # The README's command, with the tiny checkpoint and local paths.
    command = [
        RAY,
        "job",
        "submit",
        "--address",
        ray_cluster["address"],
        "--working-dir",
        ".",
        "--runtime-env",
        "cluster/runtime_env.yaml",
        "--",
        "python",
        "-m",
        "granite_batch.cli",
        "run",
        "--manifest",
        str(SAMPLES / "manifest.jsonl"),
        "--output",
        str(output),
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "4",
        "--no-progress",
        "--run-id",
        "submitted",
    ]
    result = _submit(command, ray_cluster["env"])
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    assert "succeeded" in (result.stdout + result.stderr).lower()

    rows = pads.dataset(output / "transcripts", format="parquet", partitioning="hive").to_table().to_pylist()
    assert len(rows) == len({r["id"] for r in rows}) == 8
    assert all(r["error"] is None and r["run_id"] == "submitted" for r in rows)
    summary = json.loads((output / "runs" / "submitted.json").read_text())
    assert summary["status"] == "succeeded" and summary["rows_ok"] == 8


@pytest.mark.parametrize("ray_cluster", [{"head_cpus": 1}], indirect=True)
def test_model_actors_land_on_the_node_with_the_resource(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):
    """A second node offers a custom resource standing in for a GPU; the model actor must go there."""
    import os
    import time

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the state API sends the cluster token only when asked
    from ray.util.state import list_actors, list_nodes

    worker = subprocess.Popen(
        [
            RAY,
            "start",
            "--block",
            f"--address={ray_cluster['gcs']}",
            "--node-ip-address=127.0.0.1",
            "--num-cpus=1",
            '--resources={"speech_gpu": 1}',
            "--disable-usage-stats",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=ray_cluster["env"],
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while len(list_nodes(address=ray_cluster["address"], filters=[("state", "=", "ALIVE")])) < 2:
            assert time.monotonic() < deadline and worker.poll() is None, "the second node did not join"
            time.sleep(0.5)
        nodes = list_nodes(address=ray_cluster["address"], detail=True)
        gpu_node = next(n.node_id for n in nodes if n.resources_total.get("speech_gpu"))
        config = tmp_path / "job.yaml"
        config.write_text("resources:\n  actor_resources: {speech_gpu: 1}\n  decode_cpus: 0.5\n")
        result = subprocess.run(
            [
                os.sys.executable,
                "-m",
                "granite_batch.cli",
                "run",
                "--config",
                str(config),
                "--manifest",
                str(SAMPLES / "manifest.jsonl"),
                "--output",
                str(tmp_path / "out"),
                "--model",
                str(tiny_model_dir),
                "--max-new-tokens",
                "4",
                "--no-progress",
            ],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=600,
            env={**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]},
        )
        assert result.returncode == 0, result.stderr[-3000:]
        actors = [a for a in list_actors(address=ray_cluster["address"], detail=True) if "Transcriber" in a.class_name]
        assert actors and all(a.node_id == gpu_node for a in actors)
    finally:
        os.killpg(worker.pid, 9)
        worker.wait()
