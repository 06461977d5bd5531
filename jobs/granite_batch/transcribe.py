"""The inference stage on Arrow tables, and the assembly of recordings from their segments.

Segments, not recordings, are the unit of GPU work: the segment stage emits one row per speech
segment (segment.py), `transcribe_segments` turns a batch of such rows, from any recordings, into
their texts with one batched model call, and the driver's `RecordingAssembler` joins a recording's
segments back into its one output row once the last of them has arrived. The model itself
(prompting, batching, generation) is model.py, which knows nothing of Arrow.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field, replace

import numpy as np
import pyarrow as pa

from granite_batch.alignment import align_words
from granite_batch.audio import samples_from_arrow
from granite_batch.confidence import low_confidence
from granite_batch.model import SegmentResult, SpeechModel, first_line
from granite_batch.output import SEGMENT_TYPE, WORD_TYPE
from granite_batch.prompts import UNSPACED_LANGUAGES, PromptTooLong, Request, audio_token_count, fit_keywords
from granite_batch.routing import RequestFlags, row_requests, served_request
from granite_batch.speculative import BY_AUTOREGRESSIVE, BY_CTC, BY_FALLBACK, BY_VERIFICATION
from granite_batch.tags import tagged_parts

log = logging.getLogger(__name__)

# Columns a segment row has beyond its recording's.
SEGMENT_COLUMNS = ("segment_index", "segment_count", "start_s", "end_s", "channel")
# Columns the inference stage adds to each segment row; the driver folds them into the recording's row
# (`segment_text`, `segment_truncated`) and into the run summary's inference figures.
RESULT_COLUMNS = ("segment_text", "segment_truncated", "decoded_by", "new_tokens", "lm_positions",
                  "lm_padded_positions", "first_of_call", "keywords_dropped", "segment_avg_logprob",
                  "segment_words", "segment_parts")
# A tagged call (4.1-2b-plus speakers / word times) read into several output segments (tags.py).
PART_TYPE = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("text", pa.string()),
                       ("speaker", pa.string()), ("words", SEGMENT_TYPE.field("words").type)])
# A row is decided by the costliest path any of its segments took.
_DECISION_RANKING = (BY_FALLBACK, BY_AUTOREGRESSIVE, BY_VERIFICATION, BY_CTC)


def transcribe_segments(table: pa.Table, speech_model: SpeechModel, flags: RequestFlags = RequestFlags()) -> pa.Table:
    """Every segment row of `table` (from any recordings and requests) in one batched model call.

    Adds RESULT_COLUMNS and drops `samples`. Rows without samples (recordings that gave no segment)
    pass through with null results. If the batched call fails, each recording's segments are
    retried on their own, so one bad recording fails alone (its rows get `error`). Each row's request
    is the one its model is asked (routing.served_request: punctuation, speakers, word times); a
    tagged transcript (speakers, word times) becomes `segment_parts`. A transcription row asking for
    word times that its model does not tag gets `segment_words`, its words aligned to the encoder's
    CTC posteriors (alignment.py), or timed by the engine itself; otherwise it is null.
    """
    samples = samples_from_arrow(table.column("samples"))
    errors = table.column("error").to_pylist()
    ids = table.column("id").to_pylist()
    profile = getattr(speech_model, "profile", None)
    requests, punctuation, _ = row_requests(table, flags)

    rows: list[int] = []
    items: list[tuple[np.ndarray, Request]] = []
    keywords_dropped: list[int | None] = [None] * table.num_rows
    for row, piece in enumerate(samples):
        if piece is None or errors[row] is not None:
            continue
        request = served_request(requests[row], punctuation[row], profile)
        try:
            request, keywords_dropped[row] = fit_context(speech_model, request, piece)
        except PromptTooLong as exc:
            errors[row] = str(exc)
            continue
        rows.append(row)
        items.append((piece, request))
    results: list[SegmentResult | None] = [None] * table.num_rows
    tasks = table.column("task").to_pylist()
    # Word times asked for, that the served request does not get from the model's own [T:N] tags
    # (served_request keeps word_times only for a model that tags them): aligned here instead.
    tagged = bool(profile is not None and profile.word_times)
    aligned_rows = [row for row, (_, request) in zip(rows, items) if requests[row].word_times and tasks[row] == "asr"
                    and not (request.speakers or (tagged and request.word_times))]
    parts: list[list[dict] | None] = [None] * table.num_rows
    for row, (_, request), result in zip(rows, items, _generate_or_isolate(
            speech_model, items, [ids[row] for row in rows], errors, rows, bool(aligned_rows))):
        results[row] = result
        if result is not None and (request.speakers or (tagged and request.word_times)):
            parts[row] = _parts(table, row, result.text, request)
    words: list[list[dict] | None] = [None] * table.num_rows
    if aligned_rows:
        starts, ends = table.column("start_s").to_pylist(), table.column("end_s").to_pylist()
        for row in aligned_rows:
            # A translation's words were never spoken: no times for them (aligned_rows are asr only).
            result = results[row]
            if result is None:
                continue
            if result.words is not None:  # the engine timed its words itself; its last frame may pass the end
                aligned = [replace(w, start=min(w.start + starts[row], ends[row]), end=min(w.end + starts[row], ends[row]))
                           for w in result.words if w.start + starts[row] < ends[row]]
            else:
                aligned = align_words(result.ctc_log_probs, result.text, result.frame_s or 0.0, starts[row], ends[row])
            words[row] = [w.as_dict() for w in aligned]

    def column(name, kind):
        return pa.array([None if r is None else getattr(r, name) for r in results], kind)

    table = table.drop_columns(["samples"])
    table = table.set_column(table.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
    for name, values in [
        ("segment_text", column("text", pa.string())),
        ("segment_truncated", column("truncated", pa.bool_())),
        ("decoded_by", column("decided_by", pa.string())),
        ("new_tokens", column("new_tokens", pa.int64())),
        ("lm_positions", column("positions", pa.int64())),
        ("lm_padded_positions", column("padded_positions", pa.int64())),
        ("first_of_call", column("first_of_call", pa.bool_())),
        ("keywords_dropped", pa.array(keywords_dropped, pa.int32())),
        ("segment_avg_logprob", column("avg_logprob", pa.float64())),
        ("segment_words", pa.array(words, pa.list_(WORD_TYPE))),
        ("segment_parts", pa.array(parts, pa.list_(PART_TYPE))),
    ]:
        table = table.append_column(name, values)
    return table


def _parts(table: pa.Table, row: int, text: str, request: Request) -> list[dict]:
    """The output segments of one tagged call (tags.py), as PART_TYPE dicts."""
    start, end, call = (table.column(name)[row].as_py() for name in ("start_s", "end_s", "segment_index"))
    return [{"start": p.start, "end": p.end, "text": p.text, "speaker": p.speaker, "words": p.words}
            for p in tagged_parts(text, start, end, call or 0, request.speakers, request.word_times)]


def fit_context(speech_model: SpeechModel, request: Request, longest: np.ndarray) -> tuple[Request, int]:
    """`request` with the keywords that fit the language model's context beside the segment and its
    token budget, and how many were dropped (prompts.fit_keywords). Raises
    PromptTooLong when the row cannot fit at all; a model without a known context is not checked."""
    text_config = getattr(speech_model.model.config, "text_config", speech_model.model.config)
    max_positions = getattr(text_config, "max_position_embeddings", None)
    audio_processor = getattr(speech_model.processor, "audio_processor", None)
    if not max_positions or not hasattr(audio_processor, "_get_num_audio_features"):
        return request, 0
    audio_tokens = audio_token_count(audio_processor, len(longest))
    new_tokens = speech_model.token_budget(longest)
    return fit_keywords(speech_model.tokenizer, request, audio_tokens, new_tokens, max_positions,
                        getattr(speech_model, "profile", None))


def _generate_or_isolate(speech_model: SpeechModel, items: list[tuple[np.ndarray, Request]], owners: list[str],
                         errors: list, rows: list[int], posteriors: bool = False) -> list[SegmentResult | None]:
    """Generate for all items; if the batch fails, retry recording by recording (`owners` are the
    items' recording ids) so one bad recording fails alone: its rows' `errors` are set."""
    options = {"posteriors": True} if posteriors else {}
    try:
        return speech_model.generate_segments(items, **options)
    except Exception as exc:  # a failed batch must not take its neighbours down
        log.warning("batch of %d segments failed (%s); retrying recording by recording", len(items),
                    first_line(exc))
    results: list[SegmentResult | None] = [None] * len(items)
    by_owner: dict[str, list[int]] = defaultdict(list)
    for position, owner in enumerate(owners):
        by_owner[owner].append(position)
    for positions in by_owner.values():
        try:
            for position, result in zip(positions, speech_model.generate_segments([items[p] for p in positions],
                                                                                  **options)):
                results[position] = result
        except Exception as exc:
            for position in positions:
                errors[rows[position]] = f"inference failed: {type(exc).__name__}: {first_line(exc)}"[:300]
    return results


def join_segments(ordered: list[dict], separator: str) -> str:
    """A recording's text from its segments in time order. With split channels (segments with a
    `channel`), each turn, a run of segments of one channel, is its own line labelled
    `[channel N]`: "[channel 0] Hello.\n[channel 1] Hi there." """
    spoken = [s for s in ordered if s["text"]]
    if not any(s.get("channel") is not None for s in spoken):
        return separator.join(s["text"] for s in spoken)
    turns: list[tuple[int, list[str]]] = []
    for s in spoken:
        if not turns or turns[-1][0] != s["channel"]:
            turns.append((s["channel"], []))
        turns[-1][1].append(s["text"])
    return "\n".join(f"[channel {channel}] {separator.join(texts)}" for channel, texts in turns)


@dataclass
class InferenceStats:
    """How the model was fed, for the run summary (`../shared/CONTRACT.md`, `inference`)."""

    generate_calls: int = 0
    segments: int = 0
    new_tokens: int = 0
    truncated_segments: int = 0
    positions: int = 0
    padded_positions: int = 0
    scored_segments: int = 0  # segments with an avg_logprob
    low_confidence_segments: int = 0

    def summary(self) -> dict:
        return {
            "generate_calls": self.generate_calls,
            "segments": self.segments,
            "mean_segments_per_call": round(self.segments / self.generate_calls, 2) if self.generate_calls else None,
            "padding_fraction": round(self.padded_positions / self.positions, 4) if self.positions else None,
            "new_tokens": self.new_tokens,
            "truncated_segments": self.truncated_segments,
            # Segments to check by hand: mean token log-probability below confidence.LOW_CONFIDENCE_LOGPROB.
            "low_confidence_segments": self.low_confidence_segments,
            "low_confidence_fraction": (round(self.low_confidence_segments / self.scored_segments, 4)
                                        if self.scored_segments else None),
        }


@dataclass
class _Pending:
    recording: dict  # the recording's columns, from its first row to arrive that knows its segment count
    count: int | None  # None until a row says it (a long recording's segments come before its end row)
    segments: dict[int, dict] = field(default_factory=dict)
    error: str | None = None
    decided: set = field(default_factory=set)
    keywords_dropped: int = 0


class RecordingAssembler:
    """Joins segment results back into one row per recording, written only when complete.

    `add(batch)` takes segment-result rows (in any order, interleaved across recordings, as Ray
    Data delivers them) and returns the rows of the recordings completed by them: the recording's
    columns, `text` (its segments' texts in order, joined with spaces, or without for Japanese and
    Mandarin), `segments` and `decoded_by`. A recording is never returned half; `pending` says how
    many are waiting for segments. A row's `segment_count` is its recording's, or -1 for the
    segments of a long recording cut as it was decoded (decode_cut.decode_blocks): that recording's
    end row (no `segment_index`) has the count, its `duration_s` and any error (then the recording
    is an error row once the segments sent before the error have arrived).
    """

    def __init__(self):
        self.recording_schema: pa.Schema | None = None
        self.inference: dict[str, InferenceStats] = defaultdict(InferenceStats)
        self._pending: dict[str, _Pending] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, batch: pa.Table) -> pa.Table | None:
        if self.recording_schema is None:
            # The recording's own columns: everything the segment rows carry but the segment's.
            self.recording_schema = pa.schema(
                [f for f in batch.schema if f.name not in SEGMENT_COLUMNS + RESULT_COLUMNS])
        done: list[_Pending] = []
        names = self.recording_schema.names
        for row in batch.to_pylist():
            self._count(row)
            key = row["id"]
            pending = self._pending.get(key)
            known = row["segment_count"] >= 0
            if pending is None:
                pending = _Pending({name: row[name] for name in names}, row["segment_count"] if known else None)
                self._pending[key] = pending
            elif known and pending.count is None:
                pending.recording, pending.count = {name: row[name] for name in names}, row["segment_count"]
            if row["segment_index"] is not None and row["segment_index"] not in pending.segments:
                segment = {
                    "start": row["start_s"], "end": row["end_s"], "text": row["segment_text"] or "",
                    "truncated": bool(row["segment_truncated"]), "avg_logprob": row.get("segment_avg_logprob"),
                    "speaker": None, "words": row.get("segment_words"), "channel": row.get("channel"),
                }
                # A tagged call gives one output segment per speaker turn (a list in place of one segment).
                parts = row.get("segment_parts")
                pending.segments[row["segment_index"]] = [{**segment, **part} for part in parts] if parts else segment
                if row["decoded_by"] is not None:
                    pending.decided.add(row["decoded_by"])
            pending.keywords_dropped = max(pending.keywords_dropped, row.get("keywords_dropped") or 0)
            if row["error"] is not None and pending.error is None:
                pending.error = row["error"]
            if pending.count is not None and len(pending.segments) >= pending.count:
                done.append(self._pending.pop(key))
        return self._rows(done) if done else None

    def _count(self, row: dict) -> None:
        if row["new_tokens"] is None:
            return
        stats = self.inference[row.get("model") or ""]
        stats.generate_calls += bool(row["first_of_call"])
        stats.segments += 1
        stats.new_tokens += row["new_tokens"]
        stats.truncated_segments += bool(row["segment_truncated"])
        stats.positions += row["lm_positions"]
        stats.padded_positions += row["lm_padded_positions"]
        if row.get("segment_avg_logprob") is not None:
            stats.scored_segments += 1
            stats.low_confidence_segments += low_confidence(row["segment_avg_logprob"])

    def _rows(self, done: list[_Pending]) -> pa.Table:
        texts, segments, decoded_by = [], [], []
        for pending in done:
            recording = pending.recording
            if pending.error is not None:
                recording["error"] = pending.error
                texts.append(None)
                segments.append([])
                decoded_by.append(None)
                continue
            ordered = [part for k in sorted(pending.segments)
                       for part in (pending.segments[k] if isinstance(pending.segments[k], list)
                                    else [pending.segments[k]])]
            language = recording["target_language"] if recording["task"] == "ast" else recording["language"]
            separator = "" if language in UNSPACED_LANGUAGES else " "
            texts.append(join_segments(ordered, separator))
            segments.append(ordered)
            decoded_by.append(next((d for d in _DECISION_RANKING if d in pending.decided), None))
        table = pa.Table.from_pylist([p.recording for p in done], schema=self.recording_schema)
        table = table.append_column("text", pa.array(texts, pa.string()))
        table = table.append_column("segments", pa.array(segments, pa.list_(SEGMENT_TYPE)))
        # Not output columns: the driver counts them for the run summary.
        table = table.append_column("keywords_dropped", pa.array([p.keywords_dropped for p in done], pa.int32()))
        return table.append_column("decoded_by", pa.array(decoded_by, pa.string()))

