"""Compaction: the small files of each language partition become a few larger ones, the rows unchanged,
under the output's lease, and an interrupted compaction never leaves an id with two rows."""

from __future__ import annotations

import json
import posixpath

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from conftest import run_cli
from granite_batch.output.committed import list_dataset_files
from granite_batch.output.compact import JOURNAL_DIR, compact_dataset, finish_compactions
from granite_batch.output.writer import TranscriptWriter
from granite_batch.run.compaction import compact_output
from granite_batch.run.lease import LeaseTerms, take_lease
from granite_batch.schema import TRANSCRIPTS_DIR, transcript_schema
from granite_batch.storage import OutputRoot, filesystem
from test_redo import rows


def nightly_runs(output: str, options=None, nights: int = 4) -> None:
    """Four nights of small files: en and fr each night, two files per language per night."""
    for night in range(nights):
        ids = [f"n{night}-{i}" for i in range(6)]
        run_id = f"2026120{night}T000000Z-r{night}"
        night_rows = pa.concat_tables([rows(ids[:3], "m", run_id, "en"), rows(ids[3:], "m", run_id, "fr")])
        writer = TranscriptWriter(OutputRoot(output, options), run_id, transcript_schema(), rows_per_file=2)
        for row in range(night_rows.num_rows):
            writer.write(night_rows.slice(row, 1))
        writer.close()


def snapshot(output: str, options=None) -> list[tuple]:
    fs, root = filesystem(output, options)
    dataset = pads.dataset(f"{root}/{TRANSCRIPTS_DIR}", filesystem=fs, format="parquet", partitioning="hive")
    table = dataset.to_table()
    columns = ["id", "language", "text", "model", "run_id", "duration_s"]
    return sorted(zip(*(table.column(c).to_pylist() for c in columns)))


def our_files(output: str, options=None) -> list[str]:
    fs, root = filesystem(output, options)
    return list_dataset_files(fs, root).ours


@pytest.mark.parametrize("where", ["local", "s3"])
def test_compaction_merges_small_files_per_language_and_keeps_the_rows(tmp_path, where, request):
    options = None
    output = str(tmp_path / "out")
    if where == "s3":
        request.getfixturevalue("s3").mkdir("compact")
        options = {"s3": {"endpoint_url": request.getfixturevalue("s3_server")}}
        output = "s3://compact/out"
    nightly_runs(output, options)
    before, files_before = snapshot(output, options), our_files(output, options)
    assert len(files_before) == 16

    result = compact_output(OutputRoot(output, options), target_mb=64)
    after = our_files(output, options)
    assert snapshot(output, options) == before  # the same rows, each once
    assert len(after) == 2 and result.files_before == 16 and result.files_after == 2
    assert sorted(posixpath.basename(posixpath.dirname(p)) for p in after) == ["language=en", "language=fr"]
    assert result.merged == {"en": 8, "fr": 8}
    fs, root = filesystem(output, options)
    assert not fs.exists(posixpath.join(root, JOURNAL_DIR)) and not fs.exists(posixpath.join(root, "_staging"))


def test_target_size_bounds_the_merged_files(tmp_path):
    output = str(tmp_path / "out")
    nightly_runs(output)
    before = snapshot(output)
    # About three files' worth of bytes per merged file: more than one merged file per language.
    target_mb = 3.5 * max((tmp_path / p).stat().st_size for p in our_files(output)) / (1 << 20)
    result = compact_dataset(OutputRoot(output), "compact-test", target_mb=target_mb)
    assert snapshot(output) == before
    per_language = [p for p in our_files(output) if "language=en" in p]
    assert 2 <= len(per_language) < 8 and result.files_after == len(our_files(output))


def test_an_interrupted_compaction_is_finished_by_the_next_one(tmp_path):
    output = str(tmp_path / "out")
    nightly_runs(output, nights=2)
    before = snapshot(output)

    def refuse():
        raise RuntimeError("lease lost")

    with pytest.raises(RuntimeError):  # stopped before the first merged file went into place
        compact_dataset(OutputRoot(output), "compact-a", before_commit=refuse)
    assert snapshot(output) == before and (tmp_path / "out" / JOURNAL_DIR).exists()
    # Nothing merged: nothing removed.
    assert finish_compactions(OutputRoot(output)) == 0 and snapshot(output) == before

    # Killed after the merged file went into place, before its sources were removed: the rows are
    # there twice until the next compaction (or run) finishes the journal.
    sources = [p for p in our_files(output) if "language=fr" in p]
    merged = tmp_path / "out" / TRANSCRIPTS_DIR / "language=fr" / "part-compact-b-00001.parquet"
    pq.write_table(pads.dataset(sources, format="parquet").to_table(), merged)
    journal = tmp_path / "out" / JOURNAL_DIR / "compact-b-00001.json"
    journal.parent.mkdir(exist_ok=True)
    journal.write_text(json.dumps({"merged": str(merged), "sources": sources}))
    assert len(snapshot(output)) == len(before) + 6
    result = compact_output(OutputRoot(output), target_mb=64)
    assert result.recovered == len(sources) and snapshot(output) == before and not journal.exists()


def test_compact_waits_for_a_run_that_holds_the_output(tmp_path):
    output = str(tmp_path / "out")
    nightly_runs(output, nights=1)
    files = our_files(output)
    lease = take_lease(OutputRoot(output), TRANSCRIPTS_DIR, "a-running-job", LeaseTerms(wait_s=0))
    try:
        held = run_cli(["compact", output, "--no-wait"], timeout=120)
    finally:
        lease.release()
    assert held.returncode == 4 and "a-running-job" in held.stderr and our_files(output) == files
    done = run_cli(["compact", output, "--target-size-mb", "64"], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "4 files -> 2" in done.stdout and len(our_files(output)) == 2
