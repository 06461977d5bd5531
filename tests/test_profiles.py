"""Model profiles: found from the checkpoint's config, they say what each model serves and how it is prompted."""

from __future__ import annotations

import json
import logging

import pytest

from granite_batch.models import profiles
from granite_batch.models.engines import load_speech_model
from granite_batch.models.model import SpeechModel
from granite_batch.models.profiles import (
    CONSERVATIVE,
    GRANITE_SPEECH,
    GRANITE_SPEECH5_CTC,
    GRANITE_SPEECH_41,
    GRANITE_SPEECH_PLUS,
    detect_profile,
    route,
)
from granite_batch.models.prompts import Request


def test_each_tiny_folder_is_detected_from_its_config(tiny_model_dir, tiny_plus_dir, tiny_ctc_dir):
    assert detect_profile(str(tiny_model_dir)) is GRANITE_SPEECH
    assert detect_profile(str(tiny_plus_dir)) is GRANITE_SPEECH_PLUS
    assert detect_profile(str(tiny_ctc_dir)) is GRANITE_SPEECH5_CTC
    assert detect_profile(str(tiny_model_dir), override="granite-speech-4.1") is GRANITE_SPEECH_41


def test_a_41_name_selects_the_41_profile(tmp_path):
    folder = tmp_path / "granite-speech-4.1-2b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "granite_speech"}))
    assert detect_profile(str(folder)) is GRANITE_SPEECH_41
    assert profiles.profile_for("granite_speech", "ibm-granite/granite-speech-4.1-2b") is GRANITE_SPEECH_41
    assert profiles.profile_for("granite_speech", "ibm-granite/granite-4.0-1b-speech") is GRANITE_SPEECH


def test_an_unknown_granite_speech_type_is_conservative_and_warned(caplog):
    with caplog.at_level(logging.WARNING):
        assert profiles.profile_for("granite_speech6_rnnt") is CONSERVATIVE
    assert "granite_speech6_rnnt" in caplog.text
    assert CONSERVATIVE.serves(Request(language="en"))
    assert not CONSERVATIVE.serves(Request(language="fr"))
    assert not CONSERVATIVE.serves(Request(language="en", keywords=("Ray",)))
    with pytest.raises(ValueError, match="not a Granite Speech model"):
        profiles.profile_for("whisper")


@pytest.mark.parametrize(
    "profile, request_, lack",
    [
        (GRANITE_SPEECH5_CTC, Request(language="en"), None),
        (GRANITE_SPEECH5_CTC, Request(language="fr"), "fr transcription"),
        (GRANITE_SPEECH5_CTC, Request("ast", "fr", (), "en"), "translation (ast)"),
        (GRANITE_SPEECH5_CTC, Request(language="en", keywords=("Ray",)), "keywords"),
        (GRANITE_SPEECH_PLUS, Request(language="ja"), "ja transcription"),
        (GRANITE_SPEECH_PLUS, Request(language="en", speakers=True), None),
        (GRANITE_SPEECH_PLUS, Request(language="en", punctuation=True), "punctuation"),
        (
            GRANITE_SPEECH_PLUS,
            Request(language="en", speakers=True, word_times=True),
            "speaker labels and word times in one call",
        ),
        (GRANITE_SPEECH, Request(language="en", speakers=True), "speaker labels"),
        (GRANITE_SPEECH, Request(language="en", punctuation=True), "punctuation"),
        (GRANITE_SPEECH_41, Request(language="en", punctuation=True), None),
        (GRANITE_SPEECH_41, Request("ast", "en", (), "ja"), None),
        (GRANITE_SPEECH, Request("ast", "fr", ("kw",), "en"), None),
        (GRANITE_SPEECH, Request(language="auto"), None),
        (GRANITE_SPEECH_PLUS, Request(language="auto"), None),
        (
            GRANITE_SPEECH5_CTC,
            Request(language="auto"),
            "transcription of recordings of unknown language (it transcribes only en)",
        ),
    ],
)
def test_what_each_profile_lacks(profile, request_, lack):
    assert profile.unsupported(request_) == lack


def test_prompts_follow_the_cards():
    assert GRANITE_SPEECH.instruction(Request(language="en", keywords=("Ray",))) == (
        "<|audio|>can you transcribe the speech into a written format? Keywords: Ray"
    )
    assert GRANITE_SPEECH_41.instruction(Request(language="de", punctuation=True)) == (
        "<|audio|>transcribe the speech with proper punctuation and capitalization."
    )
    assert GRANITE_SPEECH_41.instruction(Request(language="de")) == (
        "<|audio|>can you transcribe the speech into a written format?"
    )
    # granite-speech-4.1-2b's "preferred prompt by task".
    assert GRANITE_SPEECH_41.instruction(Request(language="en", keywords=("Ray", "Arrow"), punctuation=True)) == (
        "<|audio|>transcribe the speech to text. Keywords: Ray, Arrow"
    )
    assert GRANITE_SPEECH_41.instruction(Request("ast", "fr", language="en")) == (
        "<|audio|>translate the speech to French."
    )
    assert GRANITE_SPEECH_41.instruction(Request("ast", "fr", language="en", punctuation=True)) == (
        "<|audio|>translate the speech to French with proper punctuation and capitalization."
    )
    assert GRANITE_SPEECH_41.instruction(Request("ast", "en", ("Ray",), "de", punctuation=True)) == (
        "<|audio|>translate the speech to English. Keywords: Ray"
    )
    assert GRANITE_SPEECH_PLUS.instruction(Request(language="en", speakers=True)).startswith(
        "<|audio|> Speaker attribution: Transcribe and denote who is speaking"
    )
    assert "[T:45]" in GRANITE_SPEECH_PLUS.instruction(Request(language="en", word_times=True))


def test_per_call_limits():
    assert GRANITE_SPEECH_PLUS.max_segment_s(Request(language="en", speakers=True)) == 540.0
    # The card's 5 minutes for timestamps, not the 3.5 of third-party copies.
    assert GRANITE_SPEECH_PLUS.max_segment_s(Request(language="en", word_times=True)) == 300.0
    assert GRANITE_SPEECH.max_segment_s(Request(language="en")) is None


def test_each_model_is_cut_at_its_own_call_length():
    # Plus runs at the call lengths IBM evaluated speakers on (2-5 min), not the 30 s of the others.
    assert GRANITE_SPEECH_PLUS.call_segment_s(None) == 180.0
    assert GRANITE_SPEECH.call_segment_s(None) == 30.0
    assert GRANITE_SPEECH5_CTC.call_segment_s(None) == 30.0
    # A length the job sets applies to every model, within each model's per-call limit.
    assert GRANITE_SPEECH.call_segment_s(120.0) == 120.0
    assert GRANITE_SPEECH_PLUS.call_segment_s(60.0) == 60.0
    assert GRANITE_SPEECH_PLUS.call_segment_s(540.0) == 300.0


def test_plus_takes_keywords_on_its_asr_prompt_only():
    request = Request(language="en", keywords=("Ray", "Granite"))
    assert GRANITE_SPEECH_PLUS.serves(request)
    assert GRANITE_SPEECH_PLUS.instruction(request) == (
        "<|audio|> can you transcribe the speech into a written format? Keywords: Ray, Granite"
    )
    assert GRANITE_SPEECH_PLUS.unsupported(Request(language="en", keywords=("Ray",), speakers=True)) == (
        "keywords with speaker labels or word times"
    )
    assert GRANITE_SPEECH_PLUS.unsupported(Request(language="en", keywords=("Ray",), word_times=True)) == (
        "keywords with speaker labels or word times"
    )
    # Word times by alignment (4.0, 4.1) keep the keyword prompt: only plus's `[T:N]` prompt has none.
    for profile in (GRANITE_SPEECH, GRANITE_SPEECH_41):
        assert profile.serves(Request(language="en", keywords=("Ray",), word_times=True)), profile.name


def test_route_picks_the_first_model_that_serves_and_names_what_is_missing():
    models = [("turbo", GRANITE_SPEECH5_CTC), ("granite", GRANITE_SPEECH)]
    assert route(Request(language="en"), models) == (0, None)
    assert route(Request(language="fr"), models) == (1, None)
    assert route(Request(language="en", keywords=("Ray",)), models) == (1, None)
    index, error = route(Request(language="en", speakers=True), models)
    assert index is None
    assert error == ("no listed model serves this row: turbo has no speaker labels; granite has no speaker labels")


def test_the_plus_checkpoint_is_prompted_with_its_system_turn(tiny_plus_dir):
    model = load_speech_model(str(tiny_plus_dir), device="cpu", max_new_tokens=8)
    assert isinstance(model, SpeechModel) and model.profile is GRANITE_SPEECH_PLUS
    prompt = model.prompt(Request(language="en", speakers=True))
    assert prompt.startswith("Knowledge Cutoff Date") and "Speaker attribution" in prompt
    assert type(model.model).__name__ == "GraniteSpeechPlusForConditionalGeneration"


def test_a_lora_checkpoint_is_refused_with_its_reason(tiny_model_dir, tmp_path):
    """granite-speech-3.3 needs peft, its adapter on for audio and a system turn: refused, clearly,
    whatever profile is forced, before any weights load."""
    import json
    import shutil

    from granite_batch.models.engines import model_profile
    from granite_batch.models.hub import ModelLoadError

    folder = tmp_path / "granite-speech-3.3-2b"
    shutil.copytree(tiny_model_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["has_lora_adapter"] = True
    (folder / "config.json").write_text(json.dumps(config))
    for override in (None, "granite-speech"):
        with pytest.raises(ModelLoadError, match="LoRA adapter .* peft") as raised:
            model_profile(str(folder), override=override)
        assert "hf download" not in str(raised.value)
    with pytest.raises(profiles.UnsupportedModel):
        detect_profile(str(folder))
