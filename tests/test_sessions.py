"""Speaker sessions: 4.1-2b-plus decodes a recording's calls in order, each given the audio so far and the
transcript so far (`prefix_text`), as transformers' documentation of the model does it ("Task 4:
Incremental decoding", docs/source/en/model_doc/granite_speech_plus.md), so speaker numbers hold
through a session."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pyarrow as pa
import pytest
import torch

from conftest import SAMPLES
from granite_batch.audio.decode import decode_audio, samples_to_arrow
from granite_batch.audio.sessions import plan_sessions, session_piece
from granite_batch.inference.assemble import RecordingAssembler
from granite_batch.inference.routing import RequestFlags, session_rows
from granite_batch.inference.transcribe import transcribe_segments
from granite_batch.models.engines import load_speech_model, model_profile
from granite_batch.models.profiles import GRANITE_SPEECH, GRANITE_SPEECH_PLUS, PLUS_SYSTEM_PROMPT, SPEAKERS_INSTRUCTION
from granite_batch.models.prompts import Request
from granite_batch.schema import SEGMENT, segment_rows

RATE = 16000
CLIPS = ("en_weather.flac", "de_bibliothek.ogg", "fr_gare.mp3")


def call(start_s: float, length_s: float, channel=None):
    start, end = int(start_s * RATE), int((start_s + length_s) * RATE)
    return start, end, channel, np.full(end - start, start_s, np.float32)


def test_sessions_take_consecutive_calls_of_one_channel_up_to_the_limit():
    calls = [call(0, 4), call(5, 4), call(10, 3), call(14, 2), call(17, 6), call(30, 1, 1)]
    sessions = plan_sessions(calls, 10 * RATE)
    assert [[c[0] // RATE for c in s] for s in sessions] == [[0, 5], [10, 14], [17], [30]]
    start, end, channel, samples, calls_of = session_piece(sessions[1], RATE)
    assert (start, end, channel) == (10 * RATE, 16 * RATE, None)
    assert samples.tolist() == [10.0] * 3 * RATE + [14.0] * 2 * RATE
    assert calls_of == [
        {"samples": 3 * RATE, "start_s": 10.0, "end_s": 13.0},
        {"samples": 2 * RATE, "start_s": 14.0, "end_s": 16.0},
    ]
    # A call longer than the limit still is a session of its own (the segment stage never cuts it).
    assert [len(s) for s in plan_sessions([call(0, 12), call(13, 1)], 10 * RATE)] == [1, 1]


def test_only_rows_a_speaker_model_serves_speakers_become_sessions():
    table = pa.table({"task": ["asr"] * 3, "language": ["en"] * 3, "speakers": [None, "false", "true"]})
    assert session_rows(table, RequestFlags(speakers=True), GRANITE_SPEECH_PLUS) == [True, False, True]
    assert session_rows(table, RequestFlags(speakers=False), GRANITE_SPEECH_PLUS) == [False, False, True]
    assert session_rows(table, RequestFlags(speakers=True), GRANITE_SPEECH) == [False, False, False]


@pytest.fixture(scope="module")
def clips():
    return [decode_audio(str(SAMPLES / name)).samples for name in CLIPS]


def session_table(clips, request: Request, index: int = 0) -> pa.Table:
    starts = np.cumsum([0.0] + [len(c) / RATE + 1.0 for c in clips])  # a second's pause between calls
    calls = [{"samples": len(c), "start_s": float(s), "end_s": float(s) + len(c) / RATE} for c, s in zip(clips, starts)]
    recording = pa.table(
        {
            "id": ["meeting"],
            "task": [request.task],
            "language": [request.language],
            "target_language": pa.nulls(1, pa.string()),
            "speakers": [request.speakers],
            "error": pa.nulls(1, pa.string()),
        }
    )
    return segment_rows(
        recording,
        samples_to_arrow([np.concatenate(clips)]),
        row_kind=SEGMENT,
        segment_index=index,
        segment_count=index + 1,
        start_s=calls[0]["start_s"],
        end_s=calls[-1]["end_s"],
        calls=[calls],
    )


# New tokens per call on both sides: the card's 2,000 (tested in test_reference_flow.py) would have the
# random tiny model run to it on every call; the same cap for both keeps this about the increments.
BUDGET = 60


def card_incremental(directory, clips, limit_samples=None) -> list[str]:
    """The documentation's Task 4, verbatim but for the device, the audio (the calls' clips) and the
    budget: each call gets all the audio so far and `prefix_text=previous_transcript`; with
    `limit_samples`, only the last calls whose audio fits it, and their text."""
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    processor = AutoProcessor.from_pretrained(directory)
    model = AutoModelForSpeechSeq2Seq.from_pretrained(directory).eval()
    chat = [
        {"role": "system", "content": PLUS_SYSTEM_PROMPT},
        {"role": "user", "content": "<|audio|> " + SPEAKERS_INSTRUCTION},
    ]
    texts: list[str] = []
    for k in range(len(clips)):
        first = k
        while limit_samples and first > 0 and sum(len(c) for c in clips[first - 1 : k + 1]) <= limit_samples:
            first -= 1
        if limit_samples is None:
            first = 0
        previous_transcript = ""
        for text in texts[first:k]:
            previous_transcript = (previous_transcript + " " + text).strip()
        all_audio = torch.cat([torch.tensor(c) for c in clips[first : k + 1]], dim=-1)
        prompt_text = processor.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True, prefix_text=previous_transcript
        )
        inputs = processor(prompt_text, all_audio, device="cpu", return_tensors="pt")
        with torch.inference_mode():
            outputs = model.generate(**inputs, max_new_tokens=BUDGET, do_sample=False, num_beams=1)
        new_tokens = outputs[0, inputs["input_ids"].shape[-1] :]
        texts.append(processor.decode(new_tokens, add_special_tokens=False, skip_special_tokens=True))
    return texts


def transcript(texts: list[str]) -> str:
    out = ""
    for text in texts:
        out = (out + " " + text).strip()
    return out


def test_a_session_is_decoded_as_the_cards_incremental_loop(tiny_plus_dir, clips):
    """Each call's text equals the card's loop on the same checkpoint, and the prefix reached the model
    (without it the calls decode differently); turns are labelled `<session>:<N>`."""
    request = Request(language="en", speakers=True)
    model = load_speech_model(
        str(tiny_plus_dir), device="cpu", profile=model_profile(str(tiny_plus_dir)), max_new_tokens=BUDGET
    )
    out = transcribe_segments(session_table(clips, request, index=2), model, RequestFlags())
    (row,) = out.to_pylist()
    assert row["error"] is None
    expected = card_incremental(tiny_plus_dir, clips)
    assert row["segment_text"] == transcript(expected) and row["segment_text"]
    # Without the transcript so far, the later calls' texts differ: the prefix is what the model saw.
    alone = model.generate_segments(
        [(np.concatenate(clips[: k + 1]), replace(request, prefix_text=None)) for k in range(len(clips))]
    )
    assert [r.text for r in alone[1:]] != [t.strip() for t in expected[1:]]
    parts = row["segment_parts"]
    assert parts and all(p["speaker"] is None or p["speaker"].startswith("2:") for p in parts)
    assert parts[0]["start"] == row["start_s"] and parts[-1]["end"] == row["end_s"]
    assert row["new_tokens"] > 0


def test_past_the_speaker_limit_the_oldest_calls_leave_the_context(tiny_plus_dir, clips):
    """A session longer than the model's speaker limit: each call's context is the last calls that fit
    it, their audio and their text (limit here: two of the three clips)."""
    request = Request(language="en", speakers=True)
    limit_s = (len(clips[1]) + len(clips[2])) / RATE + 0.01
    assert limit_s < sum(len(c) for c in clips) / RATE
    profile = replace(model_profile(str(tiny_plus_dir)), max_speakers_call_s=limit_s)
    model = load_speech_model(str(tiny_plus_dir), device="cpu", profile=profile, max_new_tokens=BUDGET)
    (row,) = transcribe_segments(session_table(clips, request), model, RequestFlags()).to_pylist()
    expected = card_incremental(tiny_plus_dir, clips, limit_samples=int(limit_s * RATE))
    assert row["segment_text"] == transcript(expected)
    assert row["segment_text"] != transcript(card_incremental(tiny_plus_dir, clips))


def test_a_template_without_prefix_text_is_refused_not_ignored(tiny_model_dir):
    """A checkpoint whose chat template has no `prefix_text` clause would drop the transcript so far
    and restart the numbering without a word: rendering such a prompt raises instead."""
    from transformers import AutoProcessor

    tokenizer = AutoProcessor.from_pretrained(tiny_model_dir).tokenizer
    with pytest.raises(ValueError, match="prefix_text"):
        GRANITE_SPEECH_PLUS.render_prompt(
            tokenizer, Request(language="en", speakers=True, prefix_text="[Speaker 1]: hi")
        )
    assert GRANITE_SPEECH_PLUS.render_prompt(tokenizer, Request(language="en", speakers=True))


class EchoModel:
    """A model double for the bookkeeping around the calls: each call's text names the call (by its
    audio's first sample) and whether it saw a transcript so far; the real model is tested above."""

    sample_rate_hz = RATE
    profile = GRANITE_SPEECH_PLUS

    def __init__(self):
        self.seen: list[tuple[float, int, str | None]] = []

    def generate_segments(self, items, **_):
        from granite_batch.models.model import SegmentResult

        out = []
        for audio, request in items:
            self.seen.append((float(audio[-1]), len(audio), request.prefix_text))
            first = int(audio[-1]) == 0
            text = "[Speaker 1]: hello [Speaker 2]: hi" if first else " and so on [Speaker 1]: bye "
            out.append(SegmentResult(text.strip(), "autoregressive", 5, raw_text=text))
        return out


def test_calls_go_in_order_with_the_transcript_so_far_and_turns_continue_across_calls():
    model = EchoModel()
    clips = [np.full(2 * RATE, float(k), np.float32) for k in range(3)]
    out = transcribe_segments(session_table(clips, Request(language="en", speakers=True), index=1), model)
    (row,) = out.to_pylist()
    # Each call: all the audio so far (ending in its own samples), the card's running transcript.
    assert [(last, n) for last, n, _ in model.seen] == [(0.0, 2 * RATE), (1.0, 4 * RATE), (2.0, 6 * RATE)]
    assert [prefix for _, _, prefix in model.seen] == [
        None,
        "[Speaker 1]: hello [Speaker 2]: hi",
        "[Speaker 1]: hello [Speaker 2]: hi  and so on [Speaker 1]: bye",
    ]
    # A call's text before its first tag goes on with the previous call's last speaker.
    assert [(p["speaker"], p["text"]) for p in row["segment_parts"]] == [
        ("1:1", "hello"),
        ("1:2", "hi"),
        ("1:2", "and so on"),
        ("1:1", "bye"),
        ("1:1", "and so on"),
        ("1:1", "bye"),
    ]
    assert [p["start"] for p in row["segment_parts"]][::2] == [0.0, 3.0, 6.0]
    assert row["new_tokens"] == 15
    # The run summary counts the calls' audio (3 x 2 s), not the pauses between them.
    assembler = RecordingAssembler()
    assembler.add(
        out.append_column("segment_model", pa.array(["plus"])).append_column("escalate_to", pa.nulls(1, pa.int32()))
    )
    assert assembler.inference["plus"].audio_s == pytest.approx(6.0)
