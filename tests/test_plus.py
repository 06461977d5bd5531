"""4.1-2b-plus through the inference stage on its tiny checkpoint: the card's prompts are used, and its
tagged output becomes segments with speakers or words inside the call's span."""

from __future__ import annotations

import pyarrow as pa
import pytest

from conftest import SAMPLES
from granite_batch.audio.decode import load_recording
from granite_batch.inference.assemble import RecordingAssembler
from granite_batch.inference.routing import RequestFlags
from granite_batch.inference.transcribe import transcribe_segments
from granite_batch.models.engines import load_speech_model
from test_transcribe import segment_rows


@pytest.fixture(scope="module")
def plus(tiny_plus_dir):
    return load_speech_model(str(tiny_plus_dir), device="cpu", max_new_tokens=24)


@pytest.fixture(scope="module")
def pieces():
    clip = load_recording(str(SAMPLES / "en_weather.flac")).samples
    return [clip[:30_000], clip[30_000:]]


@pytest.mark.parametrize(
    "flags, asked", [(RequestFlags(speakers=True), "speakers"), (RequestFlags(word_timestamps=True), "word_times")]
)
def test_tagged_calls_become_segments_inside_their_span(plus, pieces, flags, asked):
    table = segment_rows([{"id": "a", "pieces": pieces}])
    results = transcribe_segments(table, plus, flags)
    parts = results.column("segment_parts").to_pylist()
    starts, ends = table.column("start_s").to_pylist(), table.column("end_s").to_pylist()
    for call_parts, start, end in zip(parts, starts, ends):
        assert call_parts
        for part in call_parts:
            assert start <= part["start"] <= part["end"] <= end
            assert "[T:" not in part["text"] and "[Speaker" not in part["text"]
            assert (part["words"] is not None) == (asked == "word_times")
    # The card's prompt for what was asked was the one rendered.
    assert any(getattr(request, asked) for request in plus._prompts)
    (recording,) = RecordingAssembler().add(results).to_pylist()
    assert recording["segments"] and recording["error"] is None
    assert recording["text"] == " ".join(s["text"] for s in recording["segments"] if s["text"])


def test_without_flags_the_plain_prompt_and_no_parts(plus, pieces):
    results = transcribe_segments(segment_rows([{"id": "a", "pieces": pieces}]), plus)
    assert results.column("segment_parts").to_pylist() == [None, None]


def test_41_rows_are_punctuated_by_default_and_not_when_a_row_says_no(tiny_model_dir, pieces):
    from granite_batch.models.profiles import GRANITE_SPEECH_41

    model = load_speech_model(str(tiny_model_dir), device="cpu", max_new_tokens=4, profile=GRANITE_SPEECH_41)
    table = segment_rows([{"id": "a", "pieces": pieces[:1]}])
    transcribe_segments(table, model)
    transcribe_segments(table.append_column("punctuation", pa.array([False])), model)
    prompts = {request.punctuation: prompt for request, prompt in model._prompts.items()}
    assert "proper punctuation and capitalization" in prompts[True]
    assert "can you transcribe the speech" in prompts[False]


@pytest.mark.parametrize("mode", ["speculative", "speculative-strict"])
def test_a_speculative_job_decodes_plus_autoregressively(tiny_plus_dir, plus, mode, monkeypatch):
    """Plus has no draft head IBM uses: the job's speculative mode does not apply to it, and its
    concatenated encoder output never meets the character head for a draft."""
    from granite_batch.models.prompts import Request
    from granite_batch.models.speculative import BY_AUTOREGRESSIVE, SpeculativeOptions

    speculative = load_speech_model(
        str(tiny_plus_dir), device="cpu", max_new_tokens=12, speculative=SpeculativeOptions(mode)
    )
    assert speculative.speculative.mode == "autoregressive"
    monkeypatch.setattr(speculative, "_draft", lambda *args: pytest.fail("a plus row was drafted"))
    clip = load_recording(str(SAMPLES / "en_weather.flac")).samples
    items = [(clip, Request(language="en")), (clip[:30_000], Request(language="en", speakers=True))]
    results = speculative.generate_segments(items)
    assert [r.decided_by for r in results] == [BY_AUTOREGRESSIVE] * 2
    reference = load_speech_model(str(tiny_plus_dir), device="cpu", max_new_tokens=12)
    assert [r.text for r in results] == [r.text for r in reference.generate_segments(items)]
