"""A cascade: segments one model decoded poorly are decoded again by the next model that serves them.

A model entry may say `escalate_below` (a confidence) and `escalate_on` (quality flags). Right after
that model's inference stage, `mark_escalations` picks the segments that fall short and the model
each goes on to (the first later model in the job's list that serves the row's request) and keeps their
samples; `escalate_segments`, on the later model's actor, decodes them again with the same request
and puts its results in place of the first model's. Each segment keeps its time span, so the row
keeps one segment per span; `segment_model` names the model that made it, and the row's `model` stays
the one it was routed to. The recording is only assembled once every segment has come through both
stages, so a crash between the two models loses nothing and duplicates nothing (the driver redoes a
lost batch's recordings whole).

Punctuation: a row that leaves it unset is asked of the later model as the first model made it
(`cascade_flags`), so a CTC model's unpunctuated segments are not mixed with punctuated ones; a row's
own `punctuation` column, or the job's `punctuation`, still decide where they are set.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from granite_batch.inference.routing import RequestFlags, row_requests
from granite_batch.inference.transcribe import transcribe_segments
from granite_batch.models.model import SpeechModel
from granite_batch.models.profiles import ModelProfile, route
from granite_batch.models.quality import SegmentQuality
from granite_batch.schema import QUALITY_TYPE, RESULT_COLUMNS


@dataclass(frozen=True)
class Cascade:
    """Where a model's segments may go on to: the job's models in order (name, profile), and this
    model's index and thresholds (config.ModelSpec `escalate_below`, `escalate_on`)."""

    models: list[tuple[str, ModelProfile]]
    index: int
    below: float | None
    on: list[str]


Model = TypeVar("Model")  # pipeline.JobModel: anything with a `spec` (config.ModelSpec)


def covers(later: ModelProfile, first: ModelProfile) -> bool:
    """Whether `later` serves every request `first` serves (profiles.ModelProfile.unsupported)."""
    return (
        first.asr_languages <= later.asr_languages
        and first.ast_pairs <= later.ast_pairs
        and all(getattr(later, flag) for flag in ("keywords", "speakers", "punctuation") if getattr(first, flag))
    )


def escalation_pairs(models: Sequence) -> list[tuple[int, int]]:
    """(escalating model, later model) for each escalation stage: the later models of a model that
    escalates, up to the first that serves everything it serves (no row could go past that one), each
    a stage (and an actor pool) after the escalating model's own."""
    pairs = []
    for i, model in enumerate(models):
        if not model.spec.escalates:
            continue
        for j in range(i + 1, len(models)):
            pairs.append((i, j))
            if covers(models[j].profile, model.profile):
                break
    return pairs


def pool_models(models: Sequence[Model]) -> list[Model]:
    """The model of each actor pool the job starts: its models, then each escalation stage's."""
    return list(models) + [models[j] for _, j in escalation_pairs(models)]


# The reason a segment below `escalate_below` gives in `quality.escalated_for`.
BELOW_CONFIDENCE = "confidence"


def cascade_flags(flags: RequestFlags, first: ModelProfile) -> RequestFlags:
    """The job's request settings as a later model is asked them for escalated segments: punctuation
    left unset follows the first model's habit."""
    return flags if flags.punctuation is not None else replace(flags, punctuation=first.punctuation)


def escalation_reasons(
    quality: dict | None, truncated: bool | None, avg_logprob: float | None, below: float | None, on: list[str]
) -> list[str]:
    """Why a decoded segment goes on: below the confidence threshold, and each `on` flag it raises.
    A segment without a confidence (no text, beam search) is never below the threshold."""
    if quality is None:
        return []
    reasons = [BELOW_CONFIDENCE] if below is not None and avg_logprob is not None and avg_logprob < below else []
    known = SegmentQuality(
        quality["low_confidence"], quality["repetition"], quality["chars_per_s"], quality["rate"], None
    )
    return reasons + [flag for flag in known.flags(bool(truncated)) if flag in on]


def mark_escalations(
    table: pa.Table,
    samples: pa.ChunkedArray,
    models: list[tuple[str, ModelProfile]],
    index: int,
    below: float | None,
    on: list[str],
    flags: RequestFlags,
) -> pa.Table:
    """`table`, model `index`'s results (transcribe_segments), with `escalate_to` set on the segments
    that go on (to the first later model of `models` that serves the row), their reasons in
    `segment_quality.escalated_for`, and `samples` kept for those rows only (null for the others)."""
    requests, _, _ = row_requests(table, flags)
    qualities = table.column("segment_quality").to_pylist()
    truncated = table.column("segment_truncated").to_pylist()
    logprobs = table.column("segment_avg_logprob").to_pylist()
    errors = table.column("error").to_pylist()
    later = models[index + 1 :]
    targets: list[int | None] = [None] * table.num_rows
    for row, quality in enumerate(qualities):
        reasons = [] if errors[row] else escalation_reasons(quality, truncated[row], logprobs[row], below, on)
        if not reasons:
            continue
        chosen, _ = route(requests[row], later)
        if chosen is not None:
            targets[row] = index + 1 + chosen
            qualities[row] = {**quality, "escalated_for": reasons}
    keep = pa.array([target is not None for target in targets])
    table = table.set_column(
        table.schema.get_field_index("segment_quality"), "segment_quality", pa.array(qualities, QUALITY_TYPE)
    )
    table = table.append_column("escalate_to", pa.array(targets, pa.int32()))
    kept = pc.if_else(keep, samples, pa.nulls(len(samples), samples.type))
    return table.append_column("samples", kept)


def escalate_segments(
    table: pa.Table, speech_model: SpeechModel, index: int, name: str, flags: RequestFlags, last: bool
) -> pa.Table:
    """Decode again the segments of `table` whose `escalate_to` is `index`, with `speech_model` (model
    `name`), and put its results in their place. A segment this model fails on keeps the first model's
    text (its `escalated_for` says it was sent on). `last`: the final escalation stage, which drops
    `samples`."""
    chosen = pc.fill_null(pc.equal(table.column("escalate_to"), index), False)
    if pc.any(chosen).as_py():
        first = table.filter(chosen)
        inputs = first.drop_columns([c for c in RESULT_COLUMNS if c in first.column_names])
        again = transcribe_segments(inputs, speech_model, flags)
        n = again.num_rows
        again = again.append_column("segment_model", pa.array([name] * n, pa.string()))
        again = again.append_column("escalate_to", pa.nulls(n, pa.int32()))
        again = again.append_column("samples", pa.nulls(n, table.schema.field("samples").type))
        failed = pc.and_(pc.is_valid(again.column("error")), pc.is_null(first.column("error")))
        qualities = [
            None if new is None else {**new, "escalated_from": model, "escalated_for": (old or {}).get("escalated_for")}
            for new, old, model in zip(
                again.column("segment_quality").to_pylist(),
                first.column("segment_quality").to_pylist(),
                first.column("segment_model").to_pylist(),
            )
        ]
        again = again.set_column(
            again.schema.get_field_index("segment_quality"), "segment_quality", pa.array(qualities, QUALITY_TYPE)
        )
        table = pa.concat_tables(
            [
                table.filter(pc.invert(chosen)),
                first.filter(failed),
                again.select(table.column_names).cast(table.schema).filter(pc.invert(failed)),
            ]
        )
    return table.drop_columns(["samples"]) if last else table
