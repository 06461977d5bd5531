"""Quality fields of segment rows and of assembled recordings (models/quality.py computes them)."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, cast

import pyarrow as pa

from granite_batch.models.alignment import BLANK
from granite_batch.models.model import SegmentResult
from granite_batch.models.prompts import UNDETERMINED_LANGUAGE
from granite_batch.models.quality import segment_quality, speech_ratio
from granite_batch.schema import SEGMENT_TYPE


def segment_qualities(table: pa.Table, results: list[SegmentResult | None]) -> list[dict | None]:
    """Each decoded segment's quality fields (models/quality.py), null for rows not decoded. The text's
    language is the target language of a translation."""
    columns = {name: table.column(name).to_pylist() for name in ("start_s", "end_s", "task", "language")}
    targets = table.column("target_language").to_pylist()
    out: list[dict | None] = []
    for row, result in enumerate(results):
        if result is None:
            out.append(None)
            continue
        language = targets[row] if columns["task"][row] == "ast" else columns["language"][row]
        duration_s = (columns["end_s"][row] or 0.0) - (columns["start_s"][row] or 0.0)
        speech, log_probs = result.speech_ratio, cast(Any, result.ctc_log_probs)  # a torch tensor
        if speech is None and log_probs is not None and result.frame_s:
            # An LLM model's encoder CTC head, computed for word times: its greedy path (class 0 the blank).
            speech = speech_ratio(log_probs.argmax(dim=-1).tolist(), BLANK, result.frame_s)
        quality = segment_quality(result.text, duration_s, language, result.avg_logprob, speech)
        out.append({**asdict(quality), "language_mismatch": None, "escalated_from": None, "escalated_for": None})
    return out


def mark_language_mismatch(recordings: pa.Table) -> pa.Table:
    """Set `quality.language_mismatch` on each segment of the rows whose language was identified from
    their transcript (`language_detected`): true when it is not the row's language. Identification is
    per row (a segment is too short to identify reliably), so all of a row's segments share it; rows
    not identified keep it null."""
    if "language_detected" not in recordings.column_names or recordings.column("language_detected").null_count == len(
        recordings
    ):
        return recordings
    detected = recordings.column("language_detected").to_pylist()
    languages = recordings.column("language").to_pylist()
    segments = recordings.column("segments").to_pylist()
    for row, found in enumerate(detected):
        if found is None or found == UNDETERMINED_LANGUAGE or not segments[row]:
            continue
        for segment in segments[row]:
            if segment.get("quality") is not None:
                segment["quality"]["language_mismatch"] = found != languages[row]
    index = recordings.schema.get_field_index("segments")
    return recordings.set_column(index, "segments", pa.array(segments, pa.list_(SEGMENT_TYPE)))
