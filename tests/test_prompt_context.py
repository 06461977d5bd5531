"""Prompts that would pass the model's context: keywords that do not fit are dropped, counted."""

from __future__ import annotations

import pytest
import torch

from granite_batch.models.prompts import (
    PromptTooLong,
    Request,
    audio_token_count,
    fit_keywords,
    prompt_positions,
    render_prompt,
)


@pytest.fixture(scope="module")
def processor(tiny_model_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_model_dir)


def positions_seen_by_the_model(processor, request: Request, samples: int) -> int:
    inputs = processor(
        text=[render_prompt(processor.tokenizer, request)], audio=[torch.zeros(samples)], return_tensors="pt"
    )
    return inputs["input_ids"].shape[1]


@pytest.mark.parametrize("samples", [16000, 16000 * 30 + 123])
def test_positions_are_counted_as_the_processor_expands_them(processor, samples):
    request = Request("asr", None, ("Zürich", "Ana María"), "en")
    audio = audio_token_count(processor.audio_processor, samples)
    assert audio == pytest.approx(samples / 1600, abs=3)  # about 10 a second
    assert prompt_positions(processor.tokenizer, request, audio) == positions_seen_by_the_model(
        processor, request, samples
    )


def test_keywords_past_the_context_are_dropped_and_counted(processor):
    keywords = tuple(f"name{i}" for i in range(3000))
    samples = 16000 * 30
    audio = audio_token_count(processor.audio_processor, samples)
    kept, dropped = fit_keywords(processor.tokenizer, Request("asr", None, keywords, "en"), audio, 200, 4096)
    assert 0 < len(kept.keywords) < 3000 and dropped == 3000 - len(kept.keywords)
    assert kept.keywords == keywords[: len(kept.keywords)]  # the first ones kept
    used = positions_seen_by_the_model(processor, kept, samples) + 200
    assert used <= 4096
    one_more = Request("asr", None, keywords[: len(kept.keywords) + 1], "en")
    assert positions_seen_by_the_model(processor, one_more, samples) + 200 > 4096  # as many as fit
    few = Request("asr", None, keywords[:3], "en")
    assert fit_keywords(processor.tokenizer, few, audio, 200, 4096) == (few, 0)


def test_a_row_that_cannot_fit_even_without_keywords_is_refused(processor):
    with pytest.raises(PromptTooLong, match=r"prompt too long: \d+ positions .* exceed the model's 512"):
        fit_keywords(processor.tokenizer, Request("asr", None, ("x",), "en"), 300, 200, 512)
