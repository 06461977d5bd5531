"""Poison rows and hostile inputs, round 2: one bad row never stops a job, nothing committed is lost."""

from __future__ import annotations

import pyarrow as pa

from granite_batch.evaluate import quality_summary, score_table


def transcripts(references: pa.Array) -> pa.Table:
    n = len(references)
    return pa.table({"id": [f"r{i}" for i in range(n)], "language": ["en"] * n, "task": ["asr"] * n,
                     "target_language": pa.nulls(n, pa.string()), "text": ["forty two"] * n,
                     "error": pa.nulls(n, pa.string()), "reference": references})


def test_numeric_references_are_scored_as_written_and_others_are_counted():
    numbers = score_table(transcripts(pa.array([42, 7])))
    assert numbers["rows_scored"] == 2 and numbers["overall"]["wer"] is not None
    # English normalisation spells both sides alike: "forty two" against 42 is no error.
    assert score_table(transcripts(pa.array([42])))["overall"]["wer"] == 0.0
    odd = score_table(transcripts(pa.array([[1, 2], None, []], pa.list_(pa.int64()))))
    assert odd["rows_scored"] == 0
    assert odd["skipped_by_reason"] == {"reference is not text": 2, "no reference": 1}
    assert score_table(transcripts(pa.array([True])))["skipped_by_reason"] == {"reference is not text": 1}


def test_quality_summary_never_raises():
    assert quality_summary(transcripts(pa.array([42])))["rows_scored"] == 1
    broken = pa.table({"reference": ["x"]})  # no text/error columns: score_table refuses it
    assert quality_summary(broken)["skipped"].startswith("quality scoring failed: ValueError: cannot score")
