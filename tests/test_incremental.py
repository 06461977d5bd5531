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
    return [
        "run",
        "--manifest",
        str(manifest),
        "--output",
        str(output),
        "--model",
        str(model),
        "--max-new-tokens",
        "4",
        "--no-progress",
    ]


def test_second_run_processes_nothing_and_retry_failed_redoes_error_rows(tmp_path, tiny_model_dir):
    broken = tmp_path / "later.wav"
    rows = [
        {"audio": str(SAMPLES / "pt_praia.wav"), "language": "pt", "id": " "},  # blank: the digest id
        {"audio": str(SAMPLES / "fr_gare.mp3"), "language": "fr"},
        {"audio": str(broken), "language": "en", "id": "fixed-later"},
    ]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    output = tmp_path / "out"

    first = run_cli(base_args(manifest, output, tiny_model_dir))
    assert first.returncode == 0, first.stderr[-2000:]
    assert len(output_rows(output)) == 3
    assert summaries(output)[0]["ids_replaced"] == 2  # the blank id, and the key missing from a row
    stray = output / "transcripts" / "language=pt" / "README.txt"
    stray.write_text("notes someone left in the output\n")  # a foreign file: skipped by name

    second = run_cli(base_args(manifest, output, tiny_model_dir))
    assert second.returncode == 0, second.stderr[-2000:]
    stray.unlink()
    assert len(output_rows(output)) == 3
    last = summaries(output)[-1]
    assert last["rows_already_done"] == 3 and last["rows_written"] == 0 and last["rows_to_do"] == 0
    assert last["foreign_files"] == [str(stray)]
    assert not (output / "_staging").exists() or not any((output / "_staging").iterdir())  # plan removed

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
    rows = [
        {"audio": str(SAMPLES / name), "language": name[:2], "id": f"row-{i:03d}"}
        for i in range(40)
        for name in [names[i % len(names)]]
    ]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    output = tmp_path / "out"
    config = tmp_path / "job.yaml"
    # Small files and batches so that some rows are committed long before the run ends; a short lease
    # expiry, so the rerun takes over the killed run's lease after 2 s instead of 10 min.
    config.write_text(
        "rows_per_file: 2\nbatch_size: 2\ndecode_batch_size: 1\ncommit_interval_s: 1\nlease_expiry_s: 2\n"
    )
    args = base_args(manifest, output, tiny_model_dir) + ["--config", str(config)]

    process = subprocess.Popen(
        [sys.executable, "-m", "granite_batch.cli", *args],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
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
    assert (
        f"taking over the stale lease on {output}/transcripts from run {summaries(output)[0]['run_id']}" in again.stderr
    )
    killed = summaries(output)[0]
    assert killed["status"] == "died"  # ended by the run that took its lease over, not running forever
    assert not (output / "_staging" / killed["run_id"]).exists()  # its plan and half-written files are gone
    final = output_rows(output)
    ids = [r["id"] for r in final]
    assert len(ids) == len(set(ids)) == 40
    assert summaries(output)[-1]["rows_already_done"] == len(written)
    assert summaries(output)[-1]["rows_written"] == 40 - len(written)


# --- planning, called directly: buckets, blocks, done/failed/new ids, foreign files -------------------

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from granite_batch.inputs.manifest import ManifestStream
from granite_batch.inputs.plan import (
    bucket_of,
    count_status,
    plan_bucket,
    plan_counts,
    plan_folder,
    prepare_plan,
    sum_counts,
)
from granite_batch.inputs.rows import Defaults
from granite_batch.output.committed import OutputError, drop_failed_rows, read_committed
from granite_batch.output.writer import TranscriptWriter
from granite_batch.schema import SEGMENT_TYPE, transcript_schema
from granite_batch.storage import OutputRoot

ROWS = 3000  # with the small blocks and spool below: 8 buckets, ~20 manifest blocks, several pieces a bucket
SMALL = {"buckets": 8, "spool_bytes": 64 << 10}


def commit_rows(output: str, run_id: str, ids: list[str], failed: set[str], storage_options=None) -> None:
    """Transcript rows for `ids` committed as a run would (our file names), `failed` ones with an error."""
    n = len(ids)
    writer = TranscriptWriter(OutputRoot(output, storage_options), run_id, transcript_schema(), rows_per_file=700)
    table = pa.table(
        {
            "id": ids,
            "audio": [f"/r/{i}.wav" for i in ids],
            "language": ["en"] * n,
            "task": ["asr"] * n,
            "target_language": pa.nulls(n, pa.string()),
            "text": [None if i in failed else "ok" for i in ids],
            "segments": pa.nulls(n, pa.list_(SEGMENT_TYPE)),
            "duration_s": [1.0] * n,
            "error": [("not found: /r/" + i) if i in failed else None for i in ids],
            "model": ["m"] * n,
            "model_revision": ["r"] * n,
            "run_id": [run_id] * n,
        }
    )
    for start in range(0, n, 700):  # a file closes after the write that passes rows_per_file
        writer.write(table.slice(start, 700))
    writer.close()


def manifest_of(path: Path, ids: list[str]) -> Path:
    return write_jsonl(path, [{"audio": f"/r/{i}.wav", "id": i, "n": k} for k, i in enumerate(ids)])


def plan_all(layout) -> tuple[pa.Table, dict]:
    planned = [plan_bucket(layout, b) for b in range(layout.buckets)]
    return pa.concat_tables([t for t, _ in planned]), sum_counts([c for _, c in planned])


def test_the_summary_counts_duplicates_that_name_another_recording(tmp_path):
    rows = [{"audio": f"/r/{i}.wav", "id": f"rec-{i}"} for i in range(50)]
    rows += [{"audio": "/r/3.wav", "id": "rec-3"}, {"audio": "/r/other.wav", "id": "rec-4"}]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    output = str(tmp_path / "out")
    layout = prepare_plan(
        ManifestStream(str(manifest), Defaults()), OutputRoot(output), plan_folder(output, "R1"), **SMALL
    )
    counts = plan_counts(layout)  # what the run summary says: the id-only pass must not hide them
    assert counts["duplicates"] == 2 and counts["duplicates_differing"] == 1
    assert layout.shard_members_skipped == {}


def test_rerun_with_every_id_done_plans_nothing_and_counts_them_all_done(tmp_path):
    ids = [f"rec-{i:05d}" for i in range(ROWS)]
    manifest = manifest_of(tmp_path / "m.jsonl", ids + ids[:40])  # 40 duplicates at the end
    output = str(tmp_path / "out")
    commit_rows(output, "R1", ids, failed=set())
    stream = ManifestStream(str(manifest), Defaults(), block_bytes=8192)
    layout = prepare_plan(stream, OutputRoot(output), plan_folder(output, "R2"), **SMALL)
    todo, counts = plan_all(layout)
    assert todo.num_rows == 0
    assert counts == {
        "rows_in": ROWS + 40,
        "duplicates": 40,
        "duplicates_differing": 0,
        "rows_already_done": ROWS,
        "rows_to_do": 0,
        "rows_retried": 0,
        "buckets_planned": 8,
    }
    assert layout.committed.rows_ok == ROWS and layout.committed.files == 5
    pieces = list((tmp_path / "out" / "_staging" / "R2" / "plan" / "manifest").glob("*/*.arrow"))
    assert len(pieces) > 8  # several pieces per bucket: the spool flushed more than once


@pytest.mark.parametrize("retry_failed", [False, True])
def test_rerun_over_done_failed_and_new_ids_plans_exactly_the_new_ones(tmp_path, retry_failed):
    done = [f"rec-{i:05d}" for i in range(0, ROWS, 2)]
    failed = {i for i in done[::7]}
    new = [f"rec-{i:05d}" for i in range(1, ROWS, 2)]
    ids = [f"rec-{i:05d}" for i in range(ROWS)]
    manifest = manifest_of(tmp_path / "m.jsonl", ids + new[:25])
    output = str(tmp_path / "out")
    commit_rows(output, "R1", done, failed)
    layout = prepare_plan(
        ManifestStream(str(manifest), Defaults(), block_bytes=8192),
        OutputRoot(output),
        str(tmp_path / "plan"),
        retry_failed=retry_failed,
        **SMALL,
    )
    todo, counts = plan_all(layout)
    expected = set(new) | (failed if retry_failed else set())
    assert sorted(todo.column("id").to_pylist()) == sorted(expected)
    assert counts["rows_to_do"] == len(expected) and counts["duplicates"] == 25
    assert counts["rows_already_done"] == len(done) - (len(failed) if retry_failed else 0)
    assert counts["rows_retried"] == (len(failed) if retry_failed else 0)
    # The first row of a duplicated id is the one planned (its `n` is its manifest position).
    positions = dict(zip(todo.column("id").to_pylist(), todo.column("n").to_pylist()))
    assert all(positions[i] == ids.index(i) for i in new[:25])
    assert todo.schema == layout.schema and layout.committed.rows_failed == len(failed)

    if retry_failed:  # what the run does next: drop the failed rows, which leaves them with no row
        drop_failed_rows(OutputRoot(output), layout.committed.failed_files)
        committed = read_committed(OutputRoot(output))
        assert not committed.failed and len(committed.ok_ids) == len(done) - len(failed)


def test_buckets_split_ids_evenly_and_the_same_way_everywhere():
    ids = pa.array([f"s3://archive/2026/{d:02d}/{i:06d}/rec.wav" for d in range(10) for i in range(2000)])
    buckets = bucket_of(ids, 16)
    counts = [int((buckets == b).sum()) for b in range(16)]
    assert min(counts) > 0.8 * len(ids) / 16 and max(counts) < 1.2 * len(ids) / 16
    sliced = bucket_of(pa.chunked_array([ids.slice(5, 100), ids.slice(0, 5)]), 16)
    assert sliced.tolist() == buckets[5:105].tolist() + buckets[:5].tolist()


def test_foreign_files_in_the_output_are_skipped_by_name_and_our_broken_ones_named(tmp_path, caplog):
    ids = [f"rec-{i:04d}" for i in range(50)]
    output = tmp_path / "out"
    commit_rows(str(output), "R1", ids[:20], failed=set())
    partition = output / "transcripts" / "language=en"
    (partition / "README.txt").write_text("rows from the old job\n")
    pq.write_table(pa.table({"id": ids[20:30]}), partition / "older-export.parquet")  # no `error` column
    manifest = manifest_of(tmp_path / "m.jsonl", ids)

    with caplog.at_level("WARNING"):
        layout = prepare_plan(
            ManifestStream(str(manifest), Defaults()), OutputRoot(str(output)), str(tmp_path / "plan")
        )
    todo, counts = plan_all(layout)
    assert sorted(todo.column("id").to_pylist()) == ids[20:]  # the foreign file's ids are not done
    assert sorted(Path(p).name for p in layout.committed.foreign_files) == ["README.txt", "older-export.parquet"]
    assert "README.txt" in caplog.text and "older-export.parquet" in caplog.text
    assert read_committed(OutputRoot(str(output))).foreign_files == layout.committed.foreign_files

    own = partition / "part-R0-00001.parquet"
    pq.write_table(pa.table({"id": ["x"]}), own)  # our name, but no `error` column
    with pytest.raises(OutputError, match=r"part-R0-00001\.parquet: committed file lacks column 'error'"):
        prepare_plan(ManifestStream(str(manifest), Defaults()), OutputRoot(str(output)), str(tmp_path / "plan"))
    own.write_bytes(b"not parquet at all")
    with pytest.raises(OutputError, match=r"part-R0-00001\.parquet: committed file is not readable Parquet"):
        read_committed(OutputRoot(str(output)))


def test_status_counts_done_failed_and_pending(tmp_path):
    ids = [f"rec-{i:05d}" for i in range(ROWS)]
    output = str(tmp_path / "out")
    commit_rows(output, "R1", ids[:1000], failed=set(ids[:100]))
    status = count_status(
        OutputRoot(output), ManifestStream(str(manifest_of(tmp_path / "m.jsonl", ids)), Defaults()), buckets=4
    )
    assert (status.committed.rows_ok, status.committed.rows_failed) == (900, 100)
    assert dict(status.committed.failures_by_reason) == {"not found": 100}
    assert status.manifest["rows_to_do"] == ROWS - 1000 and status.manifest["rows_in"] == ROWS
    alone = count_status(OutputRoot(output))
    assert (alone.committed.rows_ok, alone.committed.rows_failed, alone.manifest) == (900, 100, None)


def test_planning_against_an_s3_server(s3_server, s3, tmp_path):
    options = {"s3": {"endpoint_url": s3_server}}
    s3.mkdir("plan-bucket")
    ids = [f"rec-{i:05d}" for i in range(1200)]
    output = "s3://plan-bucket/out"
    commit_rows(output, "R1", ids[:700], failed=set(ids[:50]), storage_options=options)
    s3.pipe("plan-bucket/out/transcripts/language=en/notes.txt", b"foreign")
    manifest_of(tmp_path / "m.jsonl", ids)
    s3.put(str(tmp_path / "m.jsonl"), "plan-bucket/m.jsonl")

    stream = ManifestStream("s3://plan-bucket/m.jsonl", Defaults(), options, block_bytes=8192)
    layout = prepare_plan(
        stream,
        OutputRoot(output, options),
        plan_folder(output, "R2"),
        retry_failed=True,
        buckets=4,
        spool_bytes=32 << 10,
    )
    assert layout.folder == "s3://plan-bucket/out/_staging/R2/plan"
    todo, counts = plan_all(layout)
    assert sorted(todo.column("id").to_pylist()) == ids[:50] + ids[700:]
    assert counts["rows_retried"] == 50 and counts["rows_already_done"] == 650
    assert layout.committed.foreign_files == ["s3://plan-bucket/out/transcripts/language=en/notes.txt"]
