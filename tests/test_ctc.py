"""The CTC engine (granite_speech5_ctc) on a tiny real-architecture checkpoint: batching changes nothing,
the greedy path is the model's own, and the profile is read from the folder's config."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import SAMPLES
from granite_batch.audio.decode import decode_audio
from granite_batch.models.ctc import CtcPath, CtcSpeechModel, collapse
from granite_batch.models.ctc_features import batch_features
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


@pytest.mark.parametrize("lengths", [[1600, 1601, 3199, 3200, 3201, 3360, 3519, 5000, 48_077], [16_000]])
def test_batch_features_equal_each_clip_alone(ctc_model, lengths):
    """One pass over the batch makes every row's features as that clip's own processor call does
    (lengths on and off the hop and the stacking group), where the processor's padded batch does not."""
    rng = np.random.default_rng(len(lengths))
    clips = [(rng.standard_normal(n) * 0.1).astype(np.float32) for n in lengths]
    extractor = ctc_model.feature_extractor
    features, mask = batch_features(extractor, clips, "cpu", torch.float32)
    padded = extractor(clips, sampling_rate=16_000, return_tensors="pt")["input_features"]
    worst_padded = 0.0
    for row, clip in enumerate(clips):
        alone = extractor(torch.tensor(clip), sampling_rate=16_000, return_tensors="pt")
        frames = alone["input_features"].shape[1]
        assert mask[row].tolist() == alone["attention_mask"][0].tolist() + [0] * (features.shape[1] - frames)
        torch.testing.assert_close(features[row, :frames], alone["input_features"][0], rtol=0, atol=1e-5)
        assert not features[row, frames:].any()
        worst_padded = max(worst_padded, (padded[row, :frames] - alone["input_features"][0]).abs().max().item())
    if len(clips) > 1:  # the reason for batch_features: the padded batch changes the shorter rows' tails
        assert worst_padded > 0.1


def test_batched_output_equals_one_at_a_time(ctc_model, clips, monkeypatch):
    monkeypatch.setattr("granite_batch.models.ctc.LOGPROB_ROWS", 4)  # confidences in chunks of a batch
    items = [(clip, Request(language="en")) for clip in clips]
    batched = ctc_model.generate_segments(items)
    alone = [ctc_model.generate_segments([item])[0] for item in items]
    assert [r.text for r in batched] == [r.text for r in alone]
    assert [r.new_tokens for r in batched] == [r.new_tokens for r in alone]
    assert [r.avg_logprob for r in batched] == pytest.approx([r.avg_logprob for r in alone], abs=2e-4)
    assert all(r.avg_logprob is not None for r in batched[:4])
    # Informative: the recordings give different texts, and the too-short one none.
    assert len({r.text for r in batched[:4]}) == 4
    assert batched[-1].text == "" and batched[-1].decided_by is None
    # One call of 6 segments: padding is counted, the longest row has none.
    assert sum(r.first_of_call for r in batched) == 1
    assert max(r.positions for r in batched) == len(ctc_model.frame_paths(items[:1])[0].frame_ids)
    assert min(r.padded_positions for r in batched[:6]) == 0 < max(r.padded_positions for r in batched)


def test_the_checkpoint_has_the_real_classes(ctc_model):
    """What transformers loads for a real granite_speech5_ctc checkpoint: ParakeetTokenizer with the
    blank `<|blank|>` at id 0 as its pad token, GraniteSpeech5Processor and its feature extractor."""
    from transformers import GraniteSpeech5FeatureExtractor, GraniteSpeech5Processor, ParakeetTokenizer

    assert type(ctc_model.tokenizer) is ParakeetTokenizer
    assert ctc_model.tokenizer.pad_token == "<|blank|>" and ctc_model.tokenizer.pad_token_id == 0
    assert ctc_model.blank_id == 0 == ctc_model.model.config.pad_token_id
    assert type(ctc_model.processor) is GraniteSpeech5Processor
    assert type(ctc_model.feature_extractor) is GraniteSpeech5FeatureExtractor


def _path_of(tokenizer, text: str) -> list[int]:
    """A greedy frame path spelling `text`: each token over two frames, a blank between tokens."""
    path = [0]
    for token in tokenizer.encode(text, add_special_tokens=False):
        path += [token, token, 0]
    return path


def _with_path(ctc_model, monkeypatch, path):
    monkeypatch.setattr(ctc_model, "_decode", lambda clips: [CtcPath(path, ctc_model.frame_s, 0)] * len(clips))
    return ctc_model.generate_segments([(np.zeros(16_000, np.float32), Request(language="en"))], posteriors=True)[0]


@pytest.mark.parametrize("text", ["no no 2000 the the", "El rápido zorro marrón"])
def test_the_path_is_decoded_once(ctc_model, monkeypatch, text):
    """Repeated tokens split by a blank stay repeated ("2000" is `Ġ2 0 0 0`: ParakeetTokenizer's own
    grouping must not merge the collapsed zeros into "20"), and the words spell the text."""
    result = _with_path(ctc_model, monkeypatch, _path_of(ctc_model.tokenizer, " " + text))
    assert result.text == text
    assert [w.text for w in result.words] == text.split()
    # The card's decode of the same frames gives the same text.
    path = _path_of(ctc_model.tokenizer, " " + text)
    assert ctc_model.processor.batch_decode([path], skip_special_tokens=True) == [text]


def test_decode_ids_is_the_tokenizers_own_ungrouped_decode(ctc_model):
    """The shortcut past ParakeetTokenizer's per-id blank filter gives its own text, repeats, blanks
    and unknown-to-bytes pieces included."""
    assert ctc_model._ungrouped_decode is not None  # the real checkpoint's class takes the shortcut
    rng = np.random.default_rng(7)
    for _ in range(200):
        ids = rng.integers(0, len(ctc_model.tokenizer), int(rng.integers(0, 40))).tolist()
        ids += ids[: int(rng.integers(0, 5))]  # repeats
        expected = ctc_model.tokenizer.decode(ids, skip_special_tokens=True, group_tokens=False)
        assert ctc_model.decode_ids(ids) == expected


def test_words_spell_the_text(ctc_model, clips):
    for result in ctc_model.generate_segments([(clip, Request(language="en")) for clip in clips], posteriors=True):
        assert " ".join(w.text for w in result.words or []) == " ".join(result.text.split())


def test_texts_are_the_models_own_greedy_ctc(ctc_model, clips):
    """The card's flow on one clip (processor -> generate -> processor.batch_decode) is our text."""
    clip = clips[0]
    features = ctc_model.processor(audio=[clip], sampling_rate=16_000, return_tensors="pt")
    with torch.inference_mode():
        frames = ctc_model.model.generate(**features)[0].tolist()
    (expected,) = ctc_model.processor.batch_decode([frames], skip_special_tokens=True)
    expected = expected.strip()
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
