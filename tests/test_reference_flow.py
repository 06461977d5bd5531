"""Per model type, the job's text for a one-segment clip equals the model card's reference flow on the
same tiny checkpoint: processor -> generate -> the card's decode call, with the card's prompt and
settings. The tiny checkpoints carry the classes, special tokens and id layout the real ones name, so
a difference in prompting, budgets or decoding shows up here.

Reference flows (public sources):
- granite-4.0-1b-speech and granite-speech-4.1-2b cards (https://huggingface.co/ibm-granite/...):
  user turn only, `<|audio|>` right before the instruction, `generate(max_new_tokens=200,
  do_sample=False, num_beams=1)`, `tokenizer.batch_decode(new_tokens, add_special_tokens=False,
  skip_special_tokens=True)`; 4.1's "preferred prompt by task" for punctuated ASR.
- granite-speech-4.1-2b-plus card: SYSTEM_PROMPT turn, `"<|audio|> " + instruction`,
  `max_new_tokens=2000` (10000 for timestamps), `tokenizer.decode(outputs[0, input_len:], ...)`.
- granite_speech5 docs (transformers `docs/source/en/model_doc/granite_speech5.md`):
  `processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)`.
"""

from __future__ import annotations

import pytest
import torch

from conftest import SAMPLES
from granite_batch.audio.decode import decode_audio
from granite_batch.inference.routing import served_request
from granite_batch.models.engines import load_speech_model, model_profile
from granite_batch.models.profiles import (
    GRANITE_SPEECH_41,
    PLUS_SYSTEM_PROMPT,
    PUNCTUATED_ASR_INSTRUCTION,
    SPEAKERS_INSTRUCTION,
    WORD_TIMES_INSTRUCTION,
)
from granite_batch.models.prompts import ASR_INSTRUCTION, Request

# The job's default budget (config.GenerationOptions): no cap, 16 + 12 tokens per second.
JOB_BUDGET = {"max_new_tokens": None, "max_new_tokens_per_audio_s": 12.0}
# The card's settings for the base models: 200 new tokens, greedy.
CARD_BUDGET = {"max_new_tokens": 200, "max_new_tokens_per_audio_s": None}


@pytest.fixture(scope="module")
def clip():
    return decode_audio(str(SAMPLES / "de_bibliothek.ogg")).samples  # 2.6 s


def card_generate(directory, messages, clip, max_new_tokens):
    """The card's transformers flow, verbatim but for the device."""
    from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

    processor = AutoProcessor.from_pretrained(directory)
    tokenizer = processor.tokenizer
    model = AutoModelForSpeechSeq2Seq.from_pretrained(directory).eval()
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = processor(prompt, torch.tensor(clip), device="cpu", return_tensors="pt")
    with torch.inference_mode():
        outputs = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)
    new_tokens = outputs[0, inputs["input_ids"].shape[-1] :].unsqueeze(0)
    return tokenizer.batch_decode(new_tokens, add_special_tokens=False, skip_special_tokens=True)[0]


def job_text(directory, clip, request, profile=None, **budget):
    profile = profile or model_profile(str(directory))
    model = load_speech_model(str(directory), device="cpu", profile=profile, **budget)
    (result,) = model.generate_segments([(clip, served_request(request, None, profile))])
    return result


def test_tiny_llm_checkpoints_name_the_real_classes(tiny_model_dir, tiny_plus_dir):
    """GPT2Tokenizer (Granite's class), bos = eos = `<|end_of_text|>` right after `<|pad|>`, `<|audio|>`
    the last id and the config's audio token, GraniteSpeechProcessor, audio-dependent output."""
    from transformers import AutoProcessor, GPT2Tokenizer, GraniteSpeechProcessor

    for directory in (tiny_model_dir, tiny_plus_dir):
        processor = AutoProcessor.from_pretrained(directory)
        tokenizer = processor.tokenizer
        assert type(processor) is GraniteSpeechProcessor and type(tokenizer) is GPT2Tokenizer
        assert tokenizer.eos_token == tokenizer.bos_token == "<|end_of_text|>"
        assert tokenizer.pad_token == "<|pad|>" and tokenizer.eos_token_id == tokenizer.pad_token_id + 1
        assert tokenizer.audio_token == "<|audio|>"
        assert tokenizer.convert_tokens_to_ids("<|audio|>") == len(tokenizer) - 1
        config = load_speech_model(str(directory), device="cpu", max_new_tokens=8).model.config
        assert config.audio_token_index == len(tokenizer) - 1


def test_granite_speech_40_is_its_card(tiny_model_dir, clip):
    messages = [{"role": "user", "content": "<|audio|>" + ASR_INSTRUCTION}]
    expected = card_generate(tiny_model_dir, messages, clip, 200)
    result = job_text(tiny_model_dir, clip, Request(language="en"), **CARD_BUDGET)
    assert result.text == expected.strip() and result.text


@pytest.mark.parametrize(
    "request_, instruction",
    [
        (Request(language="en"), PUNCTUATED_ASR_INSTRUCTION),  # punctuated: the job's default where it can
        (Request(language="en", keywords=("Granite", "Ray")), "transcribe the speech to text. Keywords: Granite, Ray"),
        (
            Request("ast", "fr", language="en"),
            "translate the speech to French with proper punctuation and capitalization.",
        ),
    ],
    ids=["asr", "keywords", "translation"],
)
def test_granite_speech_41_is_its_card(tiny_model_dir, clip, request_, instruction):
    """4.1's card, "preferred prompt by task"."""
    messages = [{"role": "user", "content": "<|audio|>" + instruction}]
    expected = card_generate(tiny_model_dir, messages, clip, 200)
    result = job_text(tiny_model_dir, clip, request_, GRANITE_SPEECH_41, **CARD_BUDGET)
    assert result.text == expected.strip() and result.text


@pytest.mark.parametrize(
    "request_, instruction, card_budget",
    [
        (Request(language="en"), ASR_INSTRUCTION, 2000),
        (Request(language="en", speakers=True), SPEAKERS_INSTRUCTION, 2000),
        (Request(language="en", word_times=True), WORD_TIMES_INSTRUCTION, 10000),
    ],
    ids=["asr", "speakers", "word-times"],
)
def test_granite_speech_plus_is_its_card(tiny_plus_dir, clip, request_, instruction, card_budget):
    """With the job's default budget: each prompt mode gets the card's new tokens (on this clip the tiny
    model's tagged outputs run past 16 + 12 per second, and stop well within the card's budget)."""
    messages = [
        {"role": "system", "content": PLUS_SYSTEM_PROMPT},
        {"role": "user", "content": "<|audio|> " + instruction},
    ]
    expected = card_generate(tiny_plus_dir, messages, clip, card_budget)
    result = job_text(tiny_plus_dir, clip, request_, **JOB_BUDGET)
    assert not result.truncated
    assert result.text == expected.strip() and result.text


def test_turboctc_is_its_card(tiny_ctc_dir, clip):
    from transformers import AutoModelForCTC, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_ctc_dir)
    model = AutoModelForCTC.from_pretrained(tiny_ctc_dir).eval()
    inputs = processor(clip, sampling_rate=processor.feature_extractor.sampling_rate, device="cpu")
    with torch.inference_mode():
        outputs = model.generate(**inputs)
    (expected,) = processor.batch_decode(outputs, skip_special_tokens=True)
    result = job_text(tiny_ctc_dir, clip, Request(language="en"), **JOB_BUDGET)
    assert result.text == expected.strip() and result.text
