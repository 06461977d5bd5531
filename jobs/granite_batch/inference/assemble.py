"""Segment results joined back into one transcript row per recording, and the
inference figures of the run summary.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import pyarrow as pa

from granite_batch.inference.language_id import identify_recordings
from granite_batch.inference.routing import ROUTE_COLUMN
from granite_batch.models.confidence import low_confidence
from granite_batch.models.prompts import UNSPACED_LANGUAGES
from granite_batch.models.speculative import BY_AUTOREGRESSIVE, BY_CTC, BY_FALLBACK, BY_VERIFICATION
from granite_batch.schema import (
    RESULT_COLUMNS,
    SEGMENT,
    SEGMENT_COLUMNS,
    SEGMENT_TYPE,
    conform,
    transcript_schema,
)

DECISION_RANKING = (BY_FALLBACK, BY_AUTOREGRESSIVE, BY_VERIFICATION, BY_CTC)

log = logging.getLogger(__name__)


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
    """How the model was fed, for the run summary (docs/contract.md, `inference`)."""

    generate_calls: int = 0
    segments: int = 0
    new_tokens: int = 0
    truncated_segments: int = 0
    positions: int = 0
    padded_positions: int = 0
    scored_segments: int = 0  # segments with an avg_logprob
    low_confidence_segments: int = 0
    audio_s: float = 0.0  # seconds of segments this model decoded (escalated ones included)
    flagged: Counter = field(default_factory=Counter)  # quality flag -> segments of this model's that raise it

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
            "low_confidence_fraction": (
                round(self.low_confidence_segments / self.scored_segments, 4) if self.scored_segments else None
            ),
            "audio_s": round(self.audio_s, 3),
            # Segments whose kept text raises each quality flag (schema.QUALITY_TYPE).
            "quality_flags": {flag: self.flagged[flag] for flag in ("repetition", "rate", "low_confidence")},
        }


@dataclass
class Escalated:
    """Segments one model sent on to another (inference/escalation.py), for the run summary."""

    segments: int = 0
    audio_s: float = 0.0
    why: Counter = field(default_factory=Counter)


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
    many are waiting for segments. The rows are schema.segment_rows: a SEGMENT row's
    `segment_count` is its recording's, or null for the segments of a long recording cut as it was
    decoded (decode_cut.decode_blocks), whose END row has the count, its `duration_s` and any error
    (then the recording is an error row once the segments sent before the error have arrived); a
    recording without segments is its END row alone (count 0).
    """

    def __init__(self):
        self.recording_schema: pa.Schema | None = None
        self.inference: dict[str, InferenceStats] = defaultdict(InferenceStats)
        # (from model, to model) -> segments escalated, their seconds, and the flags why.
        self.escalations: dict[tuple[str, str], Escalated] = defaultdict(Escalated)
        self._pending: dict[str, _Pending] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(self, batch: pa.Table) -> pa.Table | None:
        if self.recording_schema is None:
            # The recording's own columns: everything the segment rows carry but the segment's.
            self.recording_schema = pa.schema(
                [f for f in batch.schema if f.name not in SEGMENT_COLUMNS + RESULT_COLUMNS]
            )
        done: list[_Pending] = []
        names = self.recording_schema.names
        for row in batch.to_pylist():
            self._count(row)
            key = row["id"]
            pending = self._pending.get(key)
            count = row["segment_count"]  # null: more to come, its recording's END row has it
            if pending is None:
                pending = _Pending({name: row[name] for name in names}, count)
                self._pending[key] = pending
            elif count is not None and pending.count is None:
                pending.recording, pending.count = {name: row[name] for name in names}, count
            if row["row_kind"] == SEGMENT and row["segment_index"] not in pending.segments:
                segment = {
                    "start": row["start_s"],
                    "end": row["end_s"],
                    "text": row["segment_text"] or "",
                    "truncated": bool(row["segment_truncated"]),
                    "avg_logprob": row.get("segment_avg_logprob"),
                    "speaker": None,
                    "words": row.get("segment_words"),
                    "channel": row.get("channel"),
                    "model": row.get("segment_model") or row.get("model"),
                    "quality": row.get("segment_quality"),
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
        model = row.get("segment_model") or row.get("model") or ""
        stats = self.inference[model]
        calls = row.get("calls")  # a speaker session: its calls' audio, not the pauses between them
        seconds = (
            sum(c["end_s"] - c["start_s"] for c in calls) if calls else (row["end_s"] or 0.0) - (row["start_s"] or 0.0)
        )
        stats.audio_s += seconds
        quality = row.get("segment_quality") or {}
        stats.flagged.update(flag for flag in ("repetition", "rate", "low_confidence") if quality.get(flag))
        if quality.get("escalated_from"):
            # The first model decoded it too; its figures for it were replaced by the second's.
            self.inference[quality["escalated_from"]].audio_s += seconds
            escalated = self.escalations[(quality["escalated_from"], model)]
            escalated.segments += 1
            escalated.audio_s += seconds
            escalated.why.update(quality.get("escalated_for") or [])
        stats.generate_calls += bool(row["first_of_call"])
        stats.segments += 1
        stats.new_tokens += row["new_tokens"]
        stats.truncated_segments += bool(row["segment_truncated"])
        stats.positions += row["lm_positions"]
        stats.padded_positions += row["lm_padded_positions"]
        if row.get("segment_avg_logprob") is not None:
            stats.scored_segments += 1
            stats.low_confidence_segments += low_confidence(row["segment_avg_logprob"])

    def cascade(self) -> list[dict]:
        """The run summary's `cascade` block: per pair of models, the segments escalated, their audio
        seconds, and how many raised each reason (a segment counts under each of its reasons)."""
        return [
            {
                "from": source,
                "to": target,
                "segments": figures.segments,
                "audio_s": round(figures.audio_s, 3),
                "why": dict(figures.why.most_common()),
            }
            for (source, target), figures in sorted(self.escalations.items())
        ]

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
            ordered = [
                part
                for k in sorted(pending.segments)
                for part in (pending.segments[k] if isinstance(pending.segments[k], list) else [pending.segments[k]])
            ]
            language = recording["target_language"] if recording["task"] == "ast" else recording["language"]
            separator = "" if language in UNSPACED_LANGUAGES else " "
            texts.append(join_segments(ordered, separator))
            segments.append(ordered)
            decoded_by.append(next((d for d in DECISION_RANKING if d in pending.decided), None))
        table = pa.Table.from_pylist([p.recording for p in done], schema=self.recording_schema)
        table = table.append_column("text", pa.array(texts, pa.string()))
        table = table.append_column("segments", pa.array(segments, pa.list_(SEGMENT_TYPE)))
        # Not output columns: the driver counts them for the run summary.
        table = table.append_column("keywords_dropped", pa.array([p.keywords_dropped for p in done], pa.int32()))
        return table.append_column("decoded_by", pa.array(decoded_by, pa.string()))


# Columns the assembled rows carry for the driver's counters, not for the output.
DRIVER_COLUMNS = ("keywords_dropped", "decoded_by")


class RecordingRows:
    """The transcript rows of a stream of segment results, for one actor that sees the whole stream
    (pipeline.transcript_rows): each call returns the recordings its batch completed (possibly none),
    identified (language_id) and in the output schema (schema.transcript_schema), as the job's driver
    writes them. A recording whose segments never all arrive is never returned."""

    def __init__(self, detect_all: bool, threshold: float):
        self.assembler = RecordingAssembler()
        self.detect_all = detect_all
        self.threshold = threshold

    def __call__(self, batch: pa.Table) -> pa.Table:
        recordings = self.assembler.add(batch)
        internal = set(DRIVER_COLUMNS) | {ROUTE_COLUMN}
        schema = transcript_schema(
            pa.schema([f for f in self.assembler.recording_schema or [] if f.name not in internal])
        )
        if recordings is None:
            return schema.empty_table()
        recordings = identify_recordings(recordings, detect_all=self.detect_all, threshold=self.threshold)
        return conform(recordings, schema)
