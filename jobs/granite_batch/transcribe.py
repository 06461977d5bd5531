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
from granite_batch.prompts import UNSPACED_LANGUAGES, PromptTooLong, Request, audio_token_count, fit_keywords
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
    keywords_dropped = [0] * len(recordings)
    for row, samples in enumerate(recordings):
        if samples is None or errors[row] is not None:
            continue
        request = Request(tasks[row], targets[row], tuple(keywords[row] or ()), languages[row])
        if starts[row]:
            try:
                start, end = max(zip(starts[row], ends[row]), key=lambda bounds: bounds[1] - bounds[0])
                request, keywords_dropped[row] = fit_context(speech_model, request, samples[start:end])
            except PromptTooLong as exc:
                errors[row] = str(exc)
                continue
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
    # Not output columns: the driver counts them for the run summary.
    table = table.append_column("keywords_dropped", pa.array(keywords_dropped, pa.int32()))
    return table.append_column("decoded_by", pa.array(decoded_by, pa.string()))


def fit_context(speech_model: SpeechModel, request: Request, longest: np.ndarray) -> tuple[Request, int]:
    """`request` with the keywords that fit the language model's context beside the row's longest
    segment and its token budget, and how many were dropped (prompts.fit_keywords). Raises
    PromptTooLong when the row cannot fit at all; a model without a known context is not checked."""
    text_config = getattr(speech_model.model.config, "text_config", speech_model.model.config)
    max_positions = getattr(text_config, "max_position_embeddings", None)
    audio_processor = getattr(speech_model.processor, "audio_processor", None)
    if not max_positions or not hasattr(audio_processor, "_get_num_audio_features"):
        return request, 0
    audio_tokens = audio_token_count(audio_processor, len(longest))
    new_tokens = speech_model.token_budget(longest)
    return fit_keywords(speech_model.tokenizer, request, audio_tokens, new_tokens, max_positions)


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
