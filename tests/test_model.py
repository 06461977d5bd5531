"""Fidelity of inference: batching does not change output, and features equal the reference flow."""

from __future__ import annotations

import time

import numpy as np
import pytest
import soundfile as sf
import soxr
import torch

from conftest import SAMPLES, ffmpeg_decode
from granite_batch.audio.decode import load_recording
from granite_batch.models.hub import ModelLoadError, resolve_model
from granite_batch.models.model import SpeechModel
from granite_batch.models.prompts import Request


@pytest.fixture(scope="module")
def speech_model(tiny_model_dir):
    return SpeechModel.load(str(tiny_model_dir), max_new_tokens=24)


@pytest.fixture(scope="module")
def recordings():
    names = ["en_weather.flac", "fr_gare.mp3", "ja_tenki.flac", "pt_praia.wav", "de_bibliothek.ogg"]
    return [load_recording(str(SAMPLES / name)).samples for name in names]


def test_batched_output_equals_one_at_a_time(speech_model, recordings):
    # Different lengths (2.6 s to 7.8 s) and different requests in one batch.
    requests = [Request(), Request("ast", "en"), Request(), Request(keywords=("praia",)), Request()]
    items = list(zip(recordings, requests))
    one_at_a_time = [speech_model.generate([item])[0] for item in items]
    batched = speech_model.generate(items)
    assert batched == one_at_a_time
    # The check is informative: the random model's output depends on the audio.
    assert len(set(one_at_a_time)) >= 3


def test_small_audio_budget_splits_batches_without_changing_output(tiny_model_dir, recordings):
    small = SpeechModel.load(str(tiny_model_dir), max_new_tokens=24, max_batch_audio_s=8.0)
    large = SpeechModel.load(str(tiny_model_dir), max_new_tokens=24, max_batch_audio_s=600.0)
    items = [(r, Request()) for r in recordings]
    assert small.generate(items) == large.generate(items)


def test_generation_equals_transformers_reference_flow(speech_model, recordings):
    """Our path (per-recording encoder, LM on inputs_embeds) against processor + model.generate."""
    samples = recordings[0]
    prompt = speech_model.prompt(Request())
    inputs = speech_model.processor(text=prompt, audio=[torch.tensor(samples)], return_tensors="pt")
    with torch.inference_mode():
        tokens = speech_model.model.generate(**inputs, max_new_tokens=24, do_sample=False, num_beams=1)
    reference = speech_model.tokenizer.decode(tokens[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert speech_model.generate([(samples, Request())])[0] == reference.strip()


def test_pipeline_features_equal_reference_decode_then_processor(speech_model):
    """The features the job hands the model, against decode by another route then the processor.

    Route 1: soundfile + soxr (one-shot): the same resampler, so features agree to float rounding.
    Route 2: the ffmpeg CLI (its own resampler): on a log-mel scale whose values span about 2
    (log10 mel / 4 + 1), the 75 lowest of 80 mel bins (up to about 6.5 kHz) agree within 2e-3;
    the top bins differ more (up to 0.31 measured) because the resamplers' anti-alias filters roll
    off differently just below 8 kHz. Mean difference over all bins < 0.01.
    """
    path = SAMPLES / "en_weather.flac"
    ours = load_recording(str(path)).samples
    source, rate = sf.read(path, dtype="float32")
    via_soundfile = soxr.resample(source, rate, 16000, quality="HQ")
    via_ffmpeg = ffmpeg_decode(path)
    extract = speech_model.processor.audio_processor

    def features(samples):
        return extract([torch.tensor(samples)])["input_features"][0]

    assert len(ours) == len(via_soundfile) == len(via_ffmpeg)
    assert torch.allclose(features(ours), features(via_soundfile), atol=1e-4)
    difference = (features(ours) - features(via_ffmpeg)).abs().reshape(-1, 2, 80)  # 2 stacked frames
    assert difference[..., :75].max() < 2e-3
    assert difference.mean() < 0.01


def test_empty_or_tiny_segments_give_empty_text(speech_model, recordings):
    out = speech_model.generate([(np.zeros(800, np.float32), Request()), (recordings[0], Request())])
    assert out[0] == "" and out[1] != ""


def test_unloadable_model_says_what_to_do(tmp_path):
    # The tests run with HF_HUB_OFFLINE=1 (conftest): a Hub id not in the cache fails at once.
    started = time.monotonic()
    with pytest.raises(ModelLoadError, match="hf download no-such-org/no-such-model-granite-batch-test --local-dir"):
        resolve_model("no-such-org/no-such-model-granite-batch-test")
    assert time.monotonic() - started < 5
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="check that the folder holds config.json"):
        resolve_model(str(tmp_path))


def test_tiny_checkpoint_keeps_an_integer_embedding_multiplier(tiny_model_dir):
    import json

    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["model_type"] == "granite_speech"
    assert isinstance(config["text_config"]["embedding_multiplier"], int)
    ref = resolve_model(str(tiny_model_dir))
    assert ref.name == str(tiny_model_dir.resolve())


def test_short_segments_stop_at_their_own_token_budget(tiny_model_dir, recordings, monkeypatch):
    from granite_batch.models.speculative import SpeculativeOptions

    limited = SpeechModel.load(str(tiny_model_dir), max_new_tokens=60, max_new_tokens_per_audio_s=4.0)
    items = [(recordings[0][: int(seconds * 16000)], Request()) for seconds in (0.5, 1.5, 3.0)]
    budgets = [limited.token_budget(samples) for samples, _ in items]
    assert budgets == [16 + 2, 16 + 6, 16 + 12]
    assert limited.token_budget(np.zeros(16000 * 20, np.float32)) == 60  # never above max_new_tokens
    with torch.inference_mode():
        embeds, _ = limited._prompt_embeddings(items, [0, 1, 2])
        unlimited = limited._autoregressive(embeds, [60] * 3)
        steps = []
        language_model = limited.model.model.language_model
        original = language_model.forward
        monkeypatch.setattr(language_model, "forward", lambda *a, **k: steps.append(1) or original(*a, **k))
        within_budgets = limited._autoregressive(embeds, budgets)
    assert all(len(tokens) > budget for tokens, budget in zip(unlimited, budgets))  # would have run on
    assert within_budgets == [tokens[:budget] for tokens, budget in zip(unlimited, budgets)]
    assert len(steps) == max(budgets)  # the batch stopped at its longest budget, not at 60
    monkeypatch.undo()
    assert limited.generate(items) == [limited.generate([item])[0] for item in items]
    strict = SpeechModel.load(
        str(tiny_model_dir),
        max_new_tokens=60,
        max_new_tokens_per_audio_s=4.0,
        speculative=SpeculativeOptions("speculative-strict"),
    )
    assert strict.generate(items) == limited.generate(items)


# --- beams score Granite's scaled logits; eos comes from the tokenizer -----------------------------


def reference_beam_search(speech_model: SpeechModel, prompt, steps: int, beams: int = 2) -> list[int]:
    """Beam search written out on `lm_head(h) / logits_scaling`, h the language model's last hidden
    state (IBM's verify() scores that way; GraniteForCausalLM, which IBM's fallback() generates with,
    divides its logits so). No length penalty matters: every hypothesis has the same length, so the
    check below that no hypothesis could end keeps this equal to transformers' beam search."""
    model = speech_model.model
    scaling = model.config.text_config.logits_scaling
    eos = speech_model.tokenizer.eos_token_id
    hypotheses = [([], 0.0)]
    with torch.inference_mode():
        for _ in range(steps):
            candidates = []
            for tokens, score in hypotheses:
                sequence = torch.cat([prompt, model.get_input_embeddings()(torch.tensor(tokens, dtype=torch.long))])
                hidden = model.model.language_model(inputs_embeds=sequence[None]).last_hidden_state[0, -1]
                log_probs = torch.log_softmax(model.lm_head(hidden).float() / scaling, dim=-1)
                top = log_probs.topk(2 * beams)
                candidates += [(tokens + [int(t)], score + float(v)) for v, t in zip(top.values, top.indices)]
            candidates.sort(key=lambda candidate: -candidate[1])
            assert all(tokens[-1] != eos for tokens, _ in candidates[: 2 * beams])
            hypotheses = candidates[:beams]
    return hypotheses[0][0]


def test_transformers_returns_granite_speech_logits_unscaled(speech_model, recordings):
    """Pins transformers 5.24: GraniteSpeechForConditionalGeneration.forward returns lm_head(h), not
    lm_head(h) / logits_scaling. If an upgrade divides, this fails, and `_logits_divisor` (1 then)
    keeps beams from being divided twice (next test)."""
    model = speech_model.model
    with torch.inference_mode():
        embeds, _ = speech_model._prompt_embeddings([(recordings[0], Request())], [0])
        logits = model(inputs_embeds=embeds[0][None]).logits[0, -1]
        hidden = model.model.language_model(inputs_embeds=embeds[0][None]).last_hidden_state[0, -1]
        raw = model.lm_head(hidden)
    assert model.config.text_config.logits_scaling == 8.0
    torch.testing.assert_close(logits, raw)
    assert not torch.allclose(logits, raw / 8.0)
    assert speech_model._logits_divisor == 8.0


@pytest.mark.parametrize("model_divides", [False, True], ids=["transformers-5.24", "a-model-that-divides"])
def test_two_beams_equal_a_reference_beam_search_on_scaled_logits(tiny_model_dir, recordings, model_divides):
    beams = SpeechModel.load(str(tiny_model_dir), max_new_tokens=10, num_beams=2)
    if model_divides:  # what an upstream fix would look like: forward divides by itself

        def divide(module, args, kwargs, output):
            output.logits = output.logits / module.config.text_config.logits_scaling
            return output

        beams.model.register_forward_hook(divide, with_kwargs=True)
    # Three recordings on which the scale changes the beams' choice (de, pt) or does not (en).
    items = [(samples, Request()) for samples in (recordings[0], recordings[3], recordings[4])]
    with torch.inference_mode():
        prompts, _ = beams._prompt_embeddings(items, [0, 1, 2])
    expected = [reference_beam_search(beams, prompt, 10) for prompt in prompts]
    assert beams.generate(items) == [beams.tokenizer.decode(t, skip_special_tokens=True).strip() for t in expected]
    assert beams._logits_divisor == (1.0 if model_divides else 8.0)
    # Informative: a beam search on the unscaled logits picks other words for some of them.
    beams.__dict__["_logits_divisor"] = 1.0 if not model_divides else 1 / 8.0
    assert beams.generate(items) != [beams.tokenizer.decode(t, skip_special_tokens=True).strip() for t in expected]


def test_generation_stops_at_the_tokenizers_eos_whatever_the_generation_config_says(
    tmp_path, tiny_model_dir, speech_model, recordings
):
    """A checkpoint whose generation_config.json names another eos (a fine-tune's, say) must not stop
    the model at that token: IBM's code passes `eos_token_id=tokenizer.eos_token_id` to generate."""
    import json
    import shutil

    tokens = speech_model._autoregressive(speech_model._prompt_embeddings([(recordings[0], Request())], [0])[0], [24])[
        0
    ]
    foreign = tokens[3]  # a token the model emits early
    copy = tmp_path / "foreign-eos"
    shutil.copytree(tiny_model_dir, copy)
    config = json.loads((copy / "generation_config.json").read_text())
    config["eos_token_id"] = foreign
    (copy / "generation_config.json").write_text(json.dumps(config))
    loaded = SpeechModel.load(str(copy), max_new_tokens=24)
    assert loaded.generate([(recordings[0], Request())]) == speech_model.generate([(recordings[0], Request())])
    assert foreign != speech_model.tokenizer.eos_token_id and len(tokens) == 24


def test_a_machine_without_network_fails_fast_and_once(monkeypatch):
    """HF_HUB_OFFLINE unset, the Hub unreachable: one probe of a few seconds, then the cache only, and
    one message naming the command that works (huggingface-hub 2.x ships `hf`, not huggingface-cli)."""
    from granite_batch.models import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    hub._hub_reachable.cache_clear()
    assert hub.hub_offline()
    with pytest.raises(ModelLoadError) as raised:
        resolve_model("ibm-granite/granite-4.0-1b-speech-not-cached")
    assert hub._hub_reachable.cache_info().misses == 1  # the Hub was probed once, then only the cache read
    message = str(raised.value)
    assert "hf download ibm-granite/granite-4.0-1b-speech-not-cached --local-dir DIR" in message
    assert "huggingface-cli" not in message and "\n" not in message
    hub._hub_reachable.cache_clear()
