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
from dataclasses import replace

import numpy as np
import pyarrow as pa

from granite_batch.audio.decode import samples_from_arrow
from granite_batch.inference.quality import segment_qualities
from granite_batch.inference.routing import RequestFlags, row_requests, served_request
from granite_batch.models.alignment import align_words
from granite_batch.models.hub import first_line
from granite_batch.models.model import SegmentResult, SpeechModel
from granite_batch.models.prompts import PromptTooLong, Request, audio_token_count, fit_keywords
from granite_batch.models.tags import tagged_parts
from granite_batch.schema import PART_TYPE, QUALITY_TYPE, WORD_TYPE

log = logging.getLogger(__name__)

# A row is decided by the costliest path any of its segments took.


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
    calls = table.column("calls").to_pylist() if "calls" in table.column_names else [None] * table.num_rows
    sessions: dict[int, Request] = {}  # speaker sessions (audio/sessions.py): their calls in order, below
    for row, piece in enumerate(samples):
        if piece is None or errors[row] is not None:
            continue
        request = served_request(requests[row], punctuation[row], profile)
        if calls[row] is not None and request.speakers:
            sessions[row] = request
            continue
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
    aligned_rows = [
        row
        for row, (_, request) in zip(rows, items)
        if requests[row].word_times
        and tasks[row] == "asr"
        and not (request.speakers or (tagged and request.word_times))
    ]
    parts: list[list[dict] | None] = [None] * table.num_rows
    for row, (_, request), result in zip(
        rows,
        items,
        _generate_or_isolate(speech_model, items, [ids[row] for row in rows], errors, rows, bool(aligned_rows)),
    ):
        results[row] = result
        if result is not None and (request.speakers or (tagged and request.word_times)):
            parts[row] = _parts(table, row, result.text, request)
    if sessions:
        for row, (result, session_parts) in _decode_sessions(speech_model, table, samples, sessions, errors).items():
            results[row], parts[row] = result, session_parts
    words: list[list[dict] | None] = [None] * table.num_rows
    if aligned_rows:
        starts, ends = table.column("start_s").to_pylist(), table.column("end_s").to_pylist()
        for row in aligned_rows:
            # A translation's words were never spoken: no times for them (aligned_rows are asr only).
            result = results[row]
            if result is None:
                continue
            if result.words is not None:  # the engine timed its words itself; its last frame may pass the end
                aligned = [
                    replace(w, start=min(w.start + starts[row], ends[row]), end=min(w.end + starts[row], ends[row]))
                    for w in result.words
                    if w.start + starts[row] < ends[row]
                ]
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
        ("segment_quality", pa.array(segment_qualities(table, results), QUALITY_TYPE)),
    ]:
        table = table.append_column(name, values)
    return table


def _parts(table: pa.Table, row: int, text: str, request: Request) -> list[dict]:
    """The output segments of one tagged call (tags.py), as PART_TYPE dicts."""
    start, end, call = (table.column(name)[row].as_py() for name in ("start_s", "end_s", "segment_index"))
    return [
        {"start": p.start, "end": p.end, "text": p.text, "speaker": p.speaker, "words": p.words}
        for p in tagged_parts(text, start, end, call or 0, request.speakers, request.word_times)
    ]


def _decode_sessions(
    speech_model: SpeechModel,
    table: pa.Table,
    samples: list,
    sessions: dict[int, Request],
    errors: list,
) -> dict[int, tuple[SegmentResult, list[dict]]]:
    """Each speaker session's calls decoded in order, as transformers' documentation of
    granite-speech-4.1-2b-plus does it ("Task 4: Incremental decoding", granite_speech_plus.md): call k
    is given the session's audio up to its end and the transcript so far as `prefix_text`, built as the
    card builds it (`previous = (previous + " " + text).strip()`), so the model goes on numbering the
    speakers it has named. The audio context is capped at the model's speaker limit
    (`max_speakers_call_s`, 9 minutes): past it, the oldest calls leave the context, their audio and
    their text together (a window the card does not show; a session no longer than the limit is decoded
    exactly as the card does). Step k of all sessions runs as one batched call. A session's result
    joins its calls' (texts as the final transcript, tokens and positions summed); its parts are the
    speaker turns of all its calls, labelled `<session>:<N>`, and a call's text before its first tag
    continues the previous call's last speaker."""
    profile = getattr(speech_model, "profile", None)
    limit_s = getattr(profile, "max_speakers_call_s", None) or float("inf")
    rate = speech_model.sample_rate_hz
    ids = table.column("id").to_pylist()
    session_index = table.column("segment_index").to_pylist()
    calls = {row: table.column("calls")[row].as_py() for row in sessions}
    offsets = {row: np.cumsum([0] + [call["samples"] for call in calls[row]]) for row in sessions}
    texts: dict[int, list[str]] = {row: [] for row in sessions}
    results: dict[int, list[SegmentResult]] = {row: [] for row in sessions}
    for step in range(max(len(c) for c in calls.values())):
        rows = [row for row in sessions if errors[row] is None and step < len(calls[row])]
        items = []
        for row in rows:
            first = step  # the oldest call the context keeps: all of them up to the speaker limit
            while first > 0 and offsets[row][step + 1] - offsets[row][first - 1] <= limit_s * rate:
                first -= 1
            prefix = running_transcript(texts[row][first:step])
            audio = samples[row][offsets[row][first] : offsets[row][step + 1]]
            items.append((audio, replace(sessions[row], prefix_text=prefix or None)))
        for row, result in zip(rows, _generate_or_isolate(speech_model, items, [ids[r] for r in rows], errors, rows)):
            if result is not None:
                texts[row].append(result.text if result.raw_text is None else result.raw_text)
                results[row].append(result)
    done: dict[int, tuple[SegmentResult, list[dict]]] = {}
    for row in sessions:
        if errors[row] is not None or not results[row]:
            continue
        parts: list[dict] = []
        for k, (call, text) in enumerate(zip(calls[row], texts[row])):
            turns = tagged_parts(text, call["start_s"], call["end_s"], session_index[row] or 0, True, False)
            if k and parts and turns and turns[0].speaker is None:
                turns[0].speaker = parts[-1]["speaker"]  # the turn the previous call ended in goes on
            parts += [
                {"start": p.start, "end": p.end, "text": p.text, "speaker": p.speaker, "words": None} for p in turns
            ]
        done[row] = _joined(results[row]), parts
    return done


def running_transcript(texts: list[str]) -> str:
    """Call texts joined as the card's incremental loop joins them:
    `previous_transcript = (previous_transcript + " " + saa_text).strip()`."""
    transcript = ""
    for text in texts:
        transcript = (transcript + " " + text).strip()
    return transcript


def _joined(results: list[SegmentResult]) -> SegmentResult:
    """One session's result from its calls'."""
    transcript = running_transcript([r.text if r.raw_text is None else r.raw_text for r in results])
    tokens = sum(r.new_tokens for r in results)
    scored = [(r.avg_logprob, r.new_tokens) for r in results if r.avg_logprob is not None]
    weight = sum(n for _, n in scored)
    return SegmentResult(
        text=transcript,
        decided_by=results[0].decided_by,
        new_tokens=tokens,
        truncated=any(r.truncated for r in results),
        positions=sum(r.positions for r in results),
        padded_positions=sum(r.padded_positions for r in results),
        first_of_call=any(r.first_of_call for r in results),
        avg_logprob=sum(v * n for v, n in scored) / weight if weight else None,
    )


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
    new_tokens = speech_model.token_budget(longest, request)
    return fit_keywords(
        speech_model.tokenizer, request, audio_tokens, new_tokens, max_positions, getattr(speech_model, "profile", None)
    )


def _generate_or_isolate(
    speech_model: SpeechModel,
    items: list[tuple[np.ndarray, Request]],
    owners: list[str],
    errors: list,
    rows: list[int],
    posteriors: bool = False,
) -> list[SegmentResult | None]:
    """Generate for all items; if the batch fails, retry recording by recording (`owners` are the
    items' recording ids) so one bad recording fails alone: its rows' `errors` are set."""
    options = {"posteriors": True} if posteriors else {}
    try:
        return speech_model.generate_segments(items, **options)
    except Exception as exc:  # a failed batch must not take its neighbours down
        log.warning("batch of %d segments failed (%s); retrying recording by recording", len(items), first_line(exc))
    results: list[SegmentResult | None] = [None] * len(items)
    by_owner: dict[str, list[int]] = defaultdict(list)
    for position, owner in enumerate(owners):
        by_owner[owner].append(position)
    for positions in by_owner.values():
        try:
            for position, result in zip(
                positions, speech_model.generate_segments([items[p] for p in positions], **options)
            ):
                results[position] = result
        except Exception as exc:
            for position in positions:
                errors[rows[position]] = f"inference failed: {type(exc).__name__}: {first_line(exc)}"[:300]
    return results
