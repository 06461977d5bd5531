"""granite-speech-4.1-2b's BPE CTC drafts (IBM's run_eval_speculative_bpe.py) on a tiny checkpoint
with a random `out_llm.safetensors`: lossless speculation still equals greedy decoding."""

from __future__ import annotations

import logging
import shutil

import pytest
import torch

from conftest import SAMPLES
from granite_batch.audio.decode import load_recording
from granite_batch.models.bpe_draft import BpeDraftHead, posterior_weighted_pool
from granite_batch.models.engines import load_speech_model
from granite_batch.models.profiles import GRANITE_SPEECH_41
from granite_batch.models.prompts import Request
from granite_batch.models.speculative import BY_AUTOREGRESSIVE, SpeculativeOptions
from granite_batch.testing.tiny_model import build_tokenizer, write_tiny_bpe_head


def test_pooling_is_the_importance_weighted_mean_of_each_window():
    hidden = torch.tensor([[[1.0], [3.0], [5.0], [7.0], [9.0]]])
    importance = torch.tensor([[1.0, 3.0, 0.0, 0.0, 2.0]])
    pooled = posterior_weighted_pool(hidden, importance, window=4)
    assert pooled.shape == (1, 2, 1)
    assert pooled[0, 0, 0].item() == pytest.approx((1 * 1 + 3 * 3) / 4, rel=1e-6)
    assert pooled[0, 1, 0].item() == pytest.approx(9.0, rel=1e-6)  # the padded frames weigh nothing


def test_a_draft_maps_label_i_to_token_i_minus_1_and_collapses():
    tokenizer = build_tokenizer()
    ids = tokenizer.encode("The quick brown fox", add_special_tokens=False)
    labels = [0] + [i + 1 for i in ids for _ in range(2)] + [0]
    logits = torch.full((len(labels), len(tokenizer) + 1), -10.0)
    logits[torch.arange(len(labels)), torch.tensor(labels)] = 10.0
    text, entropy = BpeDraftHead.draft(logits, tokenizer)
    assert text == "The quick brown fox" and entropy < 1e-3
    assert BpeDraftHead.draft(torch.zeros(3, 5).index_fill_(1, torch.tensor([0]), 9.0), tokenizer) == ("", float("inf"))


@pytest.fixture(scope="module")
def tiny_41(tiny_model_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bpe") / "granite-speech-4.1-tiny"
    shutil.copytree(tiny_model_dir, folder)
    return write_tiny_bpe_head(folder)


def test_strict_speculation_with_bpe_drafts_equals_greedy(tiny_41):
    clip = load_recording(str(SAMPLES / "en_weather.flac")).samples
    items = [(clip[:n], Request(language="en")) for n in (20_000, 34_000, len(clip))]
    options = dict(device="cpu", max_new_tokens=10)
    greedy = load_speech_model(str(tiny_41), **options)
    strict = load_speech_model(str(tiny_41), speculative=SpeculativeOptions("speculative-strict"), **options)
    assert strict.profile is GRANITE_SPEECH_41 and strict.bpe_head is not None and greedy.bpe_head is None
    expected = [r.text for r in greedy.generate_segments(items)]
    results = strict.generate_segments(items)
    assert [r.text for r in results] == expected
    assert all(r.decided_by != BY_AUTOREGRESSIVE for r in results)  # every row was drafted
    drafts = [
        strict._draft(item, logits)[1]
        for item, logits in zip(items, strict._prompt_embeddings(items, [0, 1, 2], with_ctc=True)[1])
    ]
    assert len(set(drafts)) > 1  # the drafts depend on the audio


def test_a_41_checkpoint_without_the_head_decodes_autoregressively(tiny_model_dir, tmp_path, caplog):
    folder = tmp_path / "granite-speech-4.1-nohead"
    shutil.copytree(tiny_model_dir, folder)
    with caplog.at_level(logging.WARNING):
        model = load_speech_model(
            str(folder), device="cpu", max_new_tokens=4, speculative=SpeculativeOptions("speculative")
        )
    assert model.bpe_head is None and "out_llm.safetensors" in caplog.text
    clip = load_recording(str(SAMPLES / "en_weather.flac")).samples
    assert model.generate_segments([(clip, Request(language="en"))])[0].decided_by == BY_AUTOREGRESSIVE


def test_word_times_align_on_the_character_head_in_speculative_modes(tiny_41):
    """The BPE head's pooled windows (80 ms, Granite tokens) drafts; word alignment reads 20 ms
    character posteriors, the character head's, whatever the decoding mode."""
    clip = load_recording(str(SAMPLES / "en_weather.flac")).samples
    item = (clip, Request(language="en"))
    options = dict(device="cpu", max_new_tokens=6)
    plain = load_speech_model(str(tiny_41), **options).generate_segments([item], posteriors=True)[0]
    for mode in ("speculative", "speculative-strict"):
        model = load_speech_model(str(tiny_41), speculative=SpeculativeOptions(mode), **options)
        assert model.bpe_head is not None
        (result,) = model.generate_segments([item], posteriors=True)
        assert result.decided_by != BY_AUTOREGRESSIVE  # drafted with the BPE head
        assert result.ctc_log_probs.shape == plain.ctc_log_probs.shape
        assert result.ctc_log_probs.shape[-1] == model.model.config.encoder_config.output_dim
        torch.testing.assert_close(result.ctc_log_probs, plain.ctc_log_probs)
        assert result.frame_s == plain.frame_s
