"""The inference stage on Arrow tables: decoded, segmented recordings in, transcript rows out.

The model itself (prompting, batching, generation) is `model.py`, which knows nothing of Arrow;
this module turns a table's rows into (samples, request) items, one per speech segment, and the
model's texts back into the contract's `text` and `segments` columns.
"""

from __future__ import annotations

import logging
from collections import defaultdict

import numpy as np
import pyarrow as pa

from granite_batch.audio import samples_from_arrow
from granite_batch.model import SpeechModel, first_line
from granite_batch.output import SEGMENT_TYPE
from granite_batch.prompts import UNSPACED_LANGUAGES, Request
from granite_batch.speculative import BY_AUTOREGRESSIVE, BY_CTC, BY_FALLBACK, BY_VERIFICATION

log = logging.getLogger(__name__)

# A row is decided by the costliest path any of its segments took.
_DECISION_RANKING = (BY_FALLBACK, BY_AUTOREGRESSIVE, BY_VERIFICATION, BY_CTC)


def transcribe_table(table: pa.Table, speech_model: SpeechModel) -> pa.Table:
    """Every segment of every decoded row in one batched call; adds `text`, `segments`.

    Drops the samples and segment offsets: what leaves this stage is small enough to write.
    """
    recordings = samples_from_arrow(table.column("samples"))
    starts = table.column("segment_starts").to_pylist()
    ends = table.column("segment_ends").to_pylist()
    errors = table.column("error").to_pylist()
    tasks = table.column("task").to_pylist()
    targets = table.column("target_language").to_pylist()
    languages = table.column("language").to_pylist()
    keywords = table.column("keywords").to_pylist()

    items: list[tuple[np.ndarray, Request]] = []
    owners: list[tuple[int, int]] = []  # (row, segment index) for each item
    for row, samples in enumerate(recordings):
        if samples is None or errors[row] is not None:
            continue
        request = Request(tasks[row], targets[row], tuple(keywords[row] or ()), languages[row])
        for k, (start, end) in enumerate(zip(starts[row], ends[row])):
            items.append((samples[start:end], request))
            owners.append((row, k))

    generated = _generate_or_isolate(speech_model, items, owners, errors)
    rate = speech_model.sample_rate_hz
    segments: list[list[dict] | None] = [[] for _ in recordings]
    decided: list[set] = [set() for _ in recordings]
    for (row, k), result in zip(owners, generated):
        if result is not None:
            text, decision = result
            segments[row].append({"start": starts[row][k] / rate, "end": ends[row][k] / rate, "text": text})
            decided[row].add(decision)
    joined: list[str | None] = []
    for row in range(len(recordings)):
        if errors[row] is not None:
            joined.append(None)
            segments[row] = []
            continue
        language = targets[row] if tasks[row] == "ast" else languages[row]
        separator = "" if language in UNSPACED_LANGUAGES else " "
        joined.append(separator.join(s["text"] for s in segments[row] if s["text"]))
    decoded_by = [next((d for d in _DECISION_RANKING if d in decided[row]), None) if errors[row] is None else None
                  for row in range(len(recordings))]

    table = table.drop_columns(["samples", "segment_starts", "segment_ends"])
    table = table.set_column(table.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
    table = table.append_column("text", pa.array(joined, pa.string()))
    table = table.append_column("segments", pa.array(segments, pa.list_(SEGMENT_TYPE)))
    # Not an output column: the driver counts it for the run summary.
    return table.append_column("decoded_by", pa.array(decoded_by, pa.string()))


def _generate_or_isolate(speech_model: SpeechModel, items, owners, errors: list) -> list:
    """Generate for all items; if the batch fails, retry row by row so one bad row fails alone."""
    try:
        return speech_model.generate_with_decisions(items)
    except Exception as exc:  # a failed batch must not take its neighbours down
        log.warning("batch of %d segments failed (%s); retrying row by row", len(items), first_line(exc))
    texts: list = [None] * len(items)
    by_row: dict[int, list[int]] = defaultdict(list)
    for position, (row, _) in enumerate(owners):
        by_row[row].append(position)
    for row, positions in by_row.items():
        try:
            results = speech_model.generate_with_decisions([items[p] for p in positions])
            for position, result in zip(positions, results):
                texts[position] = result
        except Exception as exc:
            errors[row] = f"inference failed: {type(exc).__name__}: {first_line(exc)}"[:300]
            for position in positions:
                texts[position] = None
    return texts
