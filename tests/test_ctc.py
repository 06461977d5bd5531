"""The CTC engine (granite_speech5_ctc) on a tiny real-architecture checkpoint: batching changes nothing,
the greedy path is the model's own, and the profile is read from the folder's config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SAMPLES
from granite_batch.audio.decode import decode_audio
from granite_batch.models.ctc import CtcSpeechModel, collapse
from granite_batch.models.engines import load_speech_model
from granite_batch.models.prompts import Request


@pytest.fixture(scope="module")
def ctc_model(tiny_ctc_dir):
    return load_speech_model(str(tiny_ctc_dir), device="cpu", max_batch_audio_s=480.0, max_batch_segments=8)


@pytest.fixture(scope="module")
def clips():
    full = [
        decode_audio(str(SAMPLES / name)).samples
        for name in ("en_weather.flac", "fr_gare.mp3", "de_bibliothek.ogg", "pt_praia.wav")
    ]
    return full + [full[0][:20_000], full[1][5_000:9_000], full[0][:100]]


def test_the_folder_loads_as_the_ctc_engine(ctc_model):
    assert isinstance(ctc_model, CtcSpeechModel)
    assert ctc_model.profile.name == "granite-speech-5-ctc"
    assert ctc_model.frame_s == pytest.approx(0.08)  # 10 ms hop x 2 stacked x 2 subsampling blocks x 2


def test_collapse_merges_repeats_and_drops_blanks():
    assert collapse([0, 5, 5, 0, 5, 7, 7, 0, 0], blank_id=0) == [5, 5, 7]
    assert collapse([0, 0], blank_id=0) == []


def test_batched_output_equals_one_at_a_time(ctc_model, clips):
    items = [(clip, Request(language="en")) for clip in clips]
    batched = ctc_model.generate_segments(items)
    alone = [ctc_model.generate_segments([item])[0] for item in items]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.new_tokens for r in batched] == [r.new_tokens for r in alone]
    # Informative: the recordings give different texts, and the too-short one none.
    assert len({r.text for r in batched[:4]}) == 4
    assert batched[-1].text == "" and batched[-1].decided_by is None
    # One call of 6 segments: padding is counted, the longest row has none.
    assert sum(r.first_of_call for r in batched) == 1
    assert max(r.positions for r in batched) == len(ctc_model.frame_paths(items[:1])[0].frame_ids)
    assert min(r.padded_positions for r in batched[:6]) == 0 < max(r.padded_positions for r in batched)


def test_texts_are_the_models_own_greedy_ctc(ctc_model, clips):
    """The model's own processor + generate on one clip, collapsed and decoded, is our text."""
    clip = clips[0]
    features = ctc_model.processor(audio=[clip], sampling_rate=16_000, return_tensors="pt")
    with torch.inference_mode():
        frames = ctc_model.model.generate(**features)[0].tolist()
    expected = ctc_model.tokenizer.decode(collapse(frames, ctc_model.blank_id), skip_special_tokens=True).strip()
    (result,) = ctc_model.generate_segments([(clip, Request(language="en"))])
    assert result.text == expected and result.text
    path = ctc_model.frame_paths([(clip, Request(language="en"))])[0]
    assert path.frame_ids == frames and path.blank_id == 0
    # The blank is frequent but not everything, as in a trained model.
    assert 0.2 < np.mean(np.array(frames) == 0) < 0.95


def test_small_batches_give_the_same_texts(tiny_ctc_dir, ctc_model, clips):
    small = load_speech_model(str(tiny_ctc_dir), device="cpu", max_batch_audio_s=5.0, max_batch_segments=2)
    items = [(clip, Request(language="en")) for clip in clips]
    assert [r.text for r in small.generate_segments(items)] == [r.text for r in ctc_model.generate_segments(items)]
