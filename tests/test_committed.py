"""Output roots that every reader of committed rows must read the same way (output/committed.py):
a passthrough column whose type drifted between runs, and files under `transcripts/` that the job
did not write."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from granite_batch import results
from granite_batch.output.committed import read_committed
from granite_batch.schema import SECOND_PASS_SCHEMA, conform, file_schema, transcript_schema
from granite_batch.storage import OutputRoot


def _write_run(root, run_id: str, ids: list[str], batch: pa.Array) -> None:
    """One run's committed file, as the writer names it, with a passthrough column `batch`."""
    rows = pa.table(
        {
            "id": ids,
            "audio": [f"/a/{i}.wav" for i in ids],
            "language": ["en"] * len(ids),
            "task": ["asr"] * len(ids),
            "text": [f"text {i}" for i in ids],
            "error": [None] * len(ids),
            "model": ["m"] * len(ids),
            "run_id": [run_id] * len(ids),
            "batch": batch,
        }
    )
    schema = file_schema(transcript_schema(pa.schema([pa.field("batch", batch.type)])))
    folder = root / "transcripts" / "language=en"
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(conform(rows, schema), folder / f"part-{run_id}-00000.parquet")


def drifted_root(tmp_path):
    """Two nightly runs: `batch` was text one night and all digits the next; plus stray files."""
    root = tmp_path / "out"
    _write_run(root, "night1", ["a", "b"], pa.array(["x-1", "x-2"]))
    _write_run(root, "night2", ["c"], pa.array([20260101], pa.int64()))
    (root / "transcripts" / "README.md").write_text("notes about this archive\n")
    pq.write_table(pa.table({"other": [1.5]}), root / "transcripts" / "language=en" / "export.parquet")
    return root


def test_load_reads_a_drifted_passthrough_column_as_text_and_skips_stray_files(tmp_path):
    root = drifted_root(tmp_path)
    table = results.load(str(root))
    assert sorted(table.column("id").to_pylist()) == ["a", "b", "c"]
    assert table.schema.field("batch").type == pa.string()
    by_id = dict(zip(table.column("id").to_pylist(), table.column("batch").to_pylist()))
    assert by_id == {"a": "x-1", "b": "x-2", "c": "20260101"}
    assert "other" not in table.column_names
    assert table.column_names[:3] == ["id", "audio", "language"]


def test_load_filters_and_columns_on_a_drifted_root(tmp_path):
    root = drifted_root(tmp_path)
    table = results.load(str(root), run_id="night2", columns=["id", "language", "batch"])
    assert table.column_names == ["id", "language", "batch"]
    assert table.to_pylist() == [{"id": "c", "language": "en", "batch": "20260101"}]


def test_every_reader_agrees_on_what_is_committed(tmp_path):
    root = drifted_root(tmp_path)
    committed = read_committed(OutputRoot(str(root)))
    assert sorted(committed.ids().to_pylist()) == sorted(results.load(str(root)).column("id").to_pylist())
    assert len(committed.foreign_files) == 2


def test_second_pass_results_skip_stray_files(tmp_path):
    root = drifted_root(tmp_path)
    folder = root / "second_pass" / "qa" / "language=en"
    folder.mkdir(parents=True)
    second = pa.table(
        {
            "id": ["a"],
            "name": ["qa"],
            "output": ["answer"],
            "chunked": [False],
            "error": [None],
            "model": ["lm"],
            "run_id": ["sp1"],
        }
    )
    pq.write_table(conform(second, file_schema(SECOND_PASS_SCHEMA)), folder / "part-sp1-00000.parquet")
    (folder / "scratch.txt").write_text("not parquet")
    joined = results.second_pass_results(str(root), "qa")
    assert joined.column("id").to_pylist() == ["a"]
    assert joined.column("output").to_pylist() == ["answer"]
    assert joined.column("batch").to_pylist() == ["x-1"]


@pytest.mark.slow
def test_to_ray_reads_the_same_rows_as_load(tmp_path):
    root = drifted_root(tmp_path)
    rows = results.to_ray(str(root)).take_all()
    assert sorted((r["id"], r["batch"], r["language"]) for r in rows) == [
        ("a", "x-1", "en"),
        ("b", "x-2", "en"),
        ("c", "20260101", "en"),
    ]


def test_status_on_a_missing_root_exits_non_zero_naming_it(tmp_path):
    result = run_cli(["status", str(tmp_path / "no-such-root")])
    assert result.returncode == 2
    assert "no-such-root: no such output root" in result.stderr


def test_status_skips_stray_files_and_counts_a_drifted_root(tmp_path):
    result = run_cli(["status", str(drifted_root(tmp_path))])
    assert result.returncode == 0, result.stderr
    assert "rows done: 3 (3 ok, 0 failed)" in result.stdout
    assert result.stdout.count("skipped (not written by granite-batch)") == 2


def test_a_killed_runs_staging_is_removed_and_its_summary_ends_by_the_next_lease_holder(tmp_path):
    from granite_batch.output.summary import read_summaries, reap_dead_runs, write_summary
    from granite_batch.run.lease import Lease

    root = drifted_root(tmp_path)
    for run_id, status in (("night1", "succeeded"), ("killed", "running"), ("live", "running")):
        figures = {"started_at": f"2026-12-0{len(run_id)}T00:00:00", "rows_ok": 1, "rows_failed": 0, "wall_s": 1.0}
        write_summary(OutputRoot(str(root)), run_id, {"run_id": run_id, "status": status, **figures})
    for run_id in ("killed", "live"):
        (root / "_staging" / run_id / "plan").mkdir(parents=True)
    (root / "_staging" / "killed" / "part.parquet").write_bytes(b"half a file")
    with Lease.acquire(OutputRoot(str(root)), "transcripts", "live"):
        # Before any run reaps it, status shows the run that holds no live lease as died, not running.
        lines = run_cli(["status", str(root)]).stdout.splitlines()
        shown = dict(line.split()[:2] for line in lines if line.startswith(("killed ", "live ")))
        assert shown == {"killed": "died", "live": "running"}
        assert reap_dead_runs(OutputRoot(str(root)), "live") == ["killed"]
    assert not (root / "_staging" / "killed").exists() and (root / "_staging" / "live" / "plan").exists()
    statuses = {s["run_id"]: s["status"] for s in read_summaries(OutputRoot(str(root)))}
    assert statuses == {"killed": "died", "night1": "succeeded", "live": "running"}
    result = run_cli(["status", str(root)])
    assert "killed" in result.stdout and "died" in result.stdout
