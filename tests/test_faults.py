"""Worker faults: processes killed mid-run are replaced, and every id still gets exactly one row."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pyarrow.dataset as pads
import pytest

from conftest import REPO, SAMPLES, write_jsonl


def start_job(tmp_path, tiny_model_dir, ray_cluster, rows: int = 60):
    names = ["en_weather.flac", "fr_gare.mp3", "de_bibliothek.ogg", "es_mercado.m4a", "pt_praia.wav"]
    manifest = write_jsonl(
        tmp_path / "m.jsonl",
        [
            {"audio": str(SAMPLES / names[i % 5]), "language": names[i % 5][:2], "id": f"row-{i:03d}"}
            for i in range(rows)
        ],
    )
    config = tmp_path / "job.yaml"
    config.write_text("rows_per_file: 2\nbatch_size: 2\ndecode_batch_size: 1\ncommit_interval_s: 1\n")
    output = tmp_path / "out"
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"]}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "granite_batch.cli",
            "run",
            "--config",
            str(config),
            "--manifest",
            str(manifest),
            "--output",
            str(output),
            "--model",
            str(tiny_model_dir),
            "--max-new-tokens",
            "40",
            "--no-progress",
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    return process, output


def wait_for(predicate, process, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert process.poll() is None, "the job ended before the fault could be injected"
        found = predicate()
        if found:
            return found
        time.sleep(0.2)
    raise TimeoutError("condition not reached")


def check_output(output, rows: int = 60):
    table = pads.dataset(output / "transcripts", format="parquet", partitioning="hive").to_table()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == rows
    assert table.column("error").null_count == rows


def committed_files(output):
    return len(list((output / "transcripts").glob("*/*.parquet"))) if (output / "transcripts").exists() else 0


@pytest.fixture(autouse=True)
def state_api_token(monkeypatch):
    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # the state API sends the cluster token only when asked


def test_killed_model_actor_is_replaced_and_no_row_is_lost_or_doubled(tmp_path, tiny_model_dir, ray_cluster):
    from ray.util.state import list_actors

    process, output = start_job(tmp_path, tiny_model_dir, ray_cluster)

    def model_actor():
        if committed_files(output) < 1:
            return None
        actors = list_actors(address=ray_cluster["address"], filters=[("state", "=", "ALIVE")])
        return next((a for a in actors if "Transcriber" in a.class_name), None)

    actor = wait_for(model_actor, process)
    os.kill(actor.pid, signal.SIGKILL)
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log[-3000:]
    check_output(output)
    # The killed actor came back (restarted in place, or replaced by a new one in the pool).
    actors = [a for a in list_actors(address=ray_cluster["address"], detail=True) if "Transcriber" in a.class_name]
    killed = next(a for a in actors if a.actor_id == actor.actor_id)
    assert killed.num_restarts >= 1 or len(actors) >= 2, (killed, committed_files(output), log[-2000:])


def test_killed_decode_worker_is_retried_and_no_row_is_lost_or_doubled(tmp_path, tiny_model_dir, ray_cluster):
    from ray.util.state import list_tasks

    process, output = start_job(tmp_path, tiny_model_dir, ray_cluster)

    def decode_task():
        tasks = list_tasks(address=ray_cluster["address"], filters=[("state", "=", "RUNNING")], detail=True)
        return next((t for t in tasks if "decode_blocks" in t.name and t.worker_pid), None)

    task = wait_for(decode_task, process)
    os.kill(task.worker_pid, signal.SIGKILL)
    log, _ = process.communicate(timeout=600)
    assert process.returncode == 0, log[-3000:]
    check_output(output)
    attempts = list_tasks(address=ray_cluster["address"], filters=[("task_id", "=", task.task_id)], detail=True)
    assert max(t.attempt_number for t in attempts) >= 1  # the killed attempt was retried
