"""Segment confidence from the chosen tokens' scaled log-probabilities, and word times on the tiny
checkpoint's own CTC posteriors, through the model's real generate path."""

from __future__ import annotations

import pytest
import torch

from conftest import SAMPLES
from granite_batch.audio.decode import load_recording
from granite_batch.models.alignment import align_words
from granite_batch.models.confidence import low_confidence, mean_logprob
from granite_batch.models.model import SpeechModel
from granite_batch.models.prompts import Request
from granite_batch.models.speculative import SpeculativeOptions


@pytest.fixture(scope="module")
def recordings():
    names = ["en_weather.flac", "ja_tenki.flac", "pt_praia.wav"]
    return [load_recording(str(SAMPLES / name)).samples for name in names]


def reference_greedy(speech_model: SpeechModel, samples, request: Request, steps: int) -> tuple[list[int], list[float]]:
    """Greedy decoding by hand, a full forward pass per step: the chosen tokens and their
    log_softmax(lm_head(h) / logits_scaling)."""
    eos = speech_model.tokenizer.eos_token_id
    embed = speech_model.model.get_input_embeddings()
    tokens, logprobs = [], []
    with torch.inference_mode():
        embeds, _ = speech_model._prompt_embeddings([(samples, request)], [0])
        for _ in range(steps):
            sequence = torch.cat([embeds[0], embed(torch.tensor(tokens, dtype=torch.long))])[None]
            logits = speech_model.model(inputs_embeds=sequence).logits[0, -1].float()
            token = int(logits.argmax())
            if token == eos:
                break
            tokens.append(token)
            logprobs.append(float(torch.log_softmax(logits / 8.0, dim=-1)[token]))
    return tokens, logprobs


def test_avg_logprob_is_the_mean_scaled_log_probability_of_the_chosen_tokens(tiny_model_dir, recordings):
    model = SpeechModel.load(str(tiny_model_dir), max_new_tokens=8)
    items = [(samples, Request()) for samples in recordings[:2]]
    results = model.generate_segments(items)
    for (samples, request), result in zip(items, results):
        tokens, expected = reference_greedy(model, samples, request, 8)
        assert result.text == model.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        assert result.avg_logprob is not None and result.avg_logprob < 0
        assert result.avg_logprob == pytest.approx(sum(expected) / len(expected), abs=1e-3)


def test_every_decoding_path_that_scores_its_tokens_reports_them(tiny_model_dir, recordings):
    items = [(samples, Request()) for samples in recordings]
    plain = SpeechModel.load(str(tiny_model_dir), max_new_tokens=12).generate_segments(items)
    strict = SpeechModel.load(
        str(tiny_model_dir), max_new_tokens=12, speculative=SpeculativeOptions("speculative-strict")
    ).generate_segments(items)
    # Strict speculation gives the greedy output, so the same tokens and the same log-probabilities.
    assert [r.text for r in strict] == [r.text for r in plain]
    assert [r.avg_logprob for r in strict] == pytest.approx([r.avg_logprob for r in plain], abs=2e-3)
    beams = SpeechModel.load(str(tiny_model_dir), max_new_tokens=12, num_beams=2).generate_segments(items)
    assert all(r.avg_logprob is None for r in beams)


def test_low_confidence_threshold():
    assert mean_logprob([]) is None and mean_logprob([-1.0, -2.0]) == -1.5
    assert low_confidence(-2.0) and not low_confidence(-0.1) and not low_confidence(None)


def test_words_on_the_tiny_checkpoint_cover_their_segment_in_order(tiny_model_dir, recordings):
    model = SpeechModel.load(str(tiny_model_dir), max_new_tokens=16)
    items = [(samples, Request()) for samples in recordings]
    plain = model.generate_segments(items)
    results = model.generate_segments(items, posteriors=True)
    assert [r.text for r in results] == [r.text for r in plain]  # posteriors change nothing else
    assert all(r.ctc_log_probs is None for r in plain)
    for (samples, _), result in zip(items, results):
        duration = len(samples) / 16000
        assert result.frame_s == pytest.approx(0.02)
        assert abs(result.ctc_log_probs.shape[0] * result.frame_s - duration) < 0.1
        start_s = 100.0
        words = align_words(result.ctc_log_probs, result.text, result.frame_s, start_s, start_s + duration)
        assert result.text and words
        assert all(start_s <= w.start < w.end <= start_s + duration for w in words)
        assert all(a.start <= b.start and a.end <= b.end for a, b in zip(words, words[1:]))
        assert "".join(w.text for w in words) == "".join(result.text.split())
