"""Self-speculative decoding: strict mode is lossless, verification is one pass, relaxed mode keeps its thresholds."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import SAMPLES
from granite_batch.audio.decode import load_recording
from granite_batch.models.model import SpeechModel
from granite_batch.models.prompts import Request
from granite_batch.models.speculative import (
    BY_AUTOREGRESSIVE,
    BY_CTC,
    BY_FALLBACK,
    BY_VERIFICATION,
    SpeculativeOptions,
    ctc_draft,
    draft_verified,
    strict_accepted,
)

MAX_NEW = 24


@pytest.fixture(scope="module")
def recordings():
    names = ["en_weather.flac", "fr_gare.mp3", "pt_praia.wav", "de_bibliothek.ogg", "es_mercado.m4a"]
    return [(load_recording(str(SAMPLES / n)).samples, Request(language=n[:2])) for n in names]


def model(tiny_model_dir, mode: str, drafter=None, **options) -> SpeechModel:
    return SpeechModel.load(
        str(tiny_model_dir), max_new_tokens=MAX_NEW, speculative=SpeculativeOptions(mode, **options), drafter=drafter
    )


@pytest.fixture(scope="module")
def greedy(tiny_model_dir, recordings):
    """Plain autoregressive greedy output: texts and token ids per recording."""
    plain = model(tiny_model_dir, "autoregressive")
    with torch.inference_mode():
        embeds, _ = plain._prompt_embeddings(recordings, list(range(len(recordings))))
        tokens = [plain._autoregressive([e], [MAX_NEW])[0] for e in embeds]
    return plain.generate(recordings), tokens


class ForwardCounter:
    """Counts forward passes of the language model inside the speech model."""

    def __init__(self, speech_model: SpeechModel, monkeypatch):
        self.calls = 0
        # The one-time probe of the logits' scale (run at first use, for token log-probabilities) is
        # not a generation pass: run it before counting.
        assert speech_model._logits_divisor == 8.0
        language_model = speech_model.model.model.language_model
        original = language_model.forward

        def counted(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        monkeypatch.setattr(language_model, "forward", counted)


def test_strict_mode_equals_greedy_with_real_ctc_drafts(tiny_model_dir, recordings, greedy):
    # The random model's CTC drafts are garbage: this exercises verification failure and fallback.
    strict = model(tiny_model_dir, "speculative-strict")
    results = strict.generate_with_decisions(recordings)
    assert [text for text, _ in results] == greedy[0]
    assert all(decision in (BY_FALLBACK, BY_VERIFICATION) for _, decision in results)


def test_a_correct_draft_is_accepted_whole_in_one_forward_pass(tiny_model_dir, recordings, greedy, monkeypatch):
    answers = {id(samples): tokens for (samples, _), tokens in zip(recordings, greedy[1])}
    strict = model(tiny_model_dir, "speculative-strict", drafter=lambda samples, request: answers[id(samples)])
    counter = ForwardCounter(strict, monkeypatch)
    results = strict.generate_with_decisions(recordings)
    assert [text for text, _ in results] == greedy[0]
    assert all(decision == BY_VERIFICATION for _, decision in results)
    assert counter.calls == 1  # one verification pass for the whole batch, no per-token steps


def test_a_draft_right_for_a_prefix_resumes_at_the_first_wrong_token(tiny_model_dir, recordings, greedy, monkeypatch):
    index = max(range(len(recordings)), key=lambda i: len(greedy[1][i]))
    right = greedy[1][index]
    assert len(right) >= 8
    keep = 5
    drafts = []
    strict = model(tiny_model_dir, "speculative-strict", drafter=lambda samples, request: drafts[0])
    wrong = (right[keep] + 1) % len(strict.tokenizer)
    drafts.append(right[:keep] + [wrong] + right[keep + 1 :])
    seen = []
    original = strict._autoregressive

    def spy(sequences, budgets, *beams):
        seen.extend(budgets)
        return original(sequences, budgets, *beams)

    monkeypatch.setattr(strict, "_autoregressive", spy)
    text, decision = strict.generate_with_decisions([recordings[index]])[0]
    assert text == greedy[0][index] and decision == BY_FALLBACK
    # 5 draft tokens accepted plus the model's own 6th: decoding resumed with 6 tokens fewer to go.
    assert seen == [MAX_NEW - (keep + 1)]


def test_translation_and_japanese_are_not_drafted(tiny_model_dir, recordings, monkeypatch):
    strict = model(
        tiny_model_dir, "speculative-strict", drafter=lambda samples, request: pytest.fail("no draft expected")
    )
    samples = recordings[0][0]
    results = strict.generate_with_decisions(
        [(samples, Request("ast", "fr", language="en")), (samples, Request(language="ja"))]
    )
    assert [decision for _, decision in results] == [BY_AUTOREGRESSIVE, BY_AUTOREGRESSIVE]


def test_relaxed_mode_accepts_a_confident_ctc_draft_without_the_language_model(tiny_model_dir, recordings, monkeypatch):
    relaxed = model(tiny_model_dir, "speculative", ctc_entropy_threshold=math.inf)
    counter = ForwardCounter(relaxed, monkeypatch)
    results = relaxed.generate_with_decisions(recordings[:2])
    drafted = [decision for _, decision in results]
    # The tiny CTC head emits some non-blank characters for real speech, so its drafts are taken.
    assert drafted == ["ctc", "ctc"] and counter.calls == 0


# --- speculative (relaxed): IBM's notebook flow on hand-made drafts -------------------------------


def scaled_probabilities(speech_model: SpeechModel, item, draft: list[int]) -> torch.Tensor:
    """[len(draft), vocab]: softmax(lm_head(h) / logits_scaling) at each draft position, the way IBM's
    verify() computes them (the language model's last hidden state, then lm_head, then the scale)."""
    with torch.inference_mode():
        embeds, _ = speech_model._prompt_embeddings([item], [0])
        embed = speech_model.model.get_input_embeddings()
        sequence = torch.cat([embeds[0], embed(torch.tensor(draft))])[None]
        hidden = speech_model.model.model.language_model(inputs_embeds=sequence).last_hidden_state[0]
        scaling = speech_model.model.config.text_config.logits_scaling
        logits = speech_model.model.lm_head(hidden[-len(draft) - 1 : -1]).float() / scaling
        return torch.softmax(logits, dim=-1)


def test_relaxed_mode_decodes_a_rejected_draft_from_scratch(tiny_model_dir, recordings, greedy):
    item = recordings[0]
    plain = model(tiny_model_dir, "autoregressive")
    first = scaled_probabilities(plain, item, [greedy[1][0][0]])[0]
    runner_up = int(first.argsort(descending=True)[1])  # probable, but not the model's choice
    second = scaled_probabilities(plain, item, [runner_up, 0])[1]
    unlikely = int(second.argmin())
    draft = [runner_up, unlikely]
    threshold = float(first[runner_up]) / 2  # the first token passes, the second does not
    assert float(second[unlikely]) < threshold
    relaxed = model(
        tiny_model_dir,
        "speculative",
        drafter=lambda samples, request: draft,
        verify_threshold=threshold,
        fallback_beams=1,  # IBM's notebook
    )
    text, decision = relaxed.generate_with_decisions([item])[0]
    # IBM's fallback() decodes the prompt alone: no draft token survives, even the probable first one.
    assert (text, decision) == (greedy[0][0], BY_FALLBACK)


def test_relaxed_mode_falls_back_with_its_beams(tiny_model_dir, recordings):
    items = recordings[:2]
    beams = SpeechModel.load(str(tiny_model_dir), max_new_tokens=MAX_NEW, num_beams=2)
    relaxed = model(
        tiny_model_dir,
        "speculative",
        drafter=lambda samples, request: [0, 0, 0],
        verify_threshold=1.0,
        fallback_beams=2,
    )
    results = relaxed.generate_with_decisions(items)
    assert [text for text, _ in results] == beams.generate(items)
    assert [decision for _, decision in results] == [BY_FALLBACK, BY_FALLBACK]
    assert beams.generate(items) != model(tiny_model_dir, "autoregressive").generate(items)  # informative


def test_relaxed_mode_takes_a_draft_whose_every_token_reaches_the_threshold(
    tiny_model_dir, recordings, greedy, monkeypatch
):
    item = recordings[1]
    plain = model(tiny_model_dir, "autoregressive")
    # Not the model's own output: the runner-up token at every step after the first.
    draft = [greedy[1][1][0]]
    for _ in range(5):
        draft.append(int(scaled_probabilities(plain, item, draft + [0])[-1].argsort(descending=True)[1]))
    least = float(scaled_probabilities(plain, item, draft).gather(1, torch.tensor(draft)[:, None]).min())
    expected = plain.tokenizer.decode(draft, skip_special_tokens=True).strip()
    assert expected != greedy[0][1]
    at = model(tiny_model_dir, "speculative", drafter=lambda samples, request: draft, verify_threshold=least * 0.999)
    assert at.generate_with_decisions([item])[0] == (expected, BY_VERIFICATION)
    counter = ForwardCounter(at, monkeypatch)  # counted once the model has made its one probe pass
    assert at.generate_with_decisions([item])[0] == (expected, BY_VERIFICATION)
    assert counter.calls == 1  # the verification pass alone
    # IBM's verify(): lm_head on the hidden states gathered at the draft's positions (and the one after),
    # never on every position of prompt and audio.
    rows = []
    handle = at.model.get_output_embeddings().register_forward_hook(
        lambda module, args, output: rows.append(args[0].shape[:-1].numel())
    )
    try:
        assert at.generate_with_decisions([item])[0] == (expected, BY_VERIFICATION)
    finally:
        handle.remove()
    assert rows == [len(draft) + 1]
    above = model(
        tiny_model_dir,
        "speculative",
        drafter=lambda samples, request: draft,
        verify_threshold=least * 1.001,
        fallback_beams=1,
    )
    assert above.generate_with_decisions([item])[0] == (greedy[0][1], BY_FALLBACK)


def test_speculative_modes_need_greedy_search(tiny_model_dir):
    with pytest.raises(ValueError, match="greedy"):
        SpeechModel.load(str(tiny_model_dir), num_beams=2, speculative=SpeculativeOptions("speculative-strict"))


def test_the_job_config_carries_ibms_settings_to_the_model_actor(tiny_model_dir):
    from granite_batch.config import GenerationOptions, load_config
    from granite_batch.pipeline import Transcriber, load_options, request_flags
    from granite_batch.run.transcription import resolve_job_models

    assert GenerationOptions().model_dump(include={"ctc_entropy_threshold", "verify_threshold", "fallback_beams"}) == {
        "ctc_entropy_threshold": None,
        "verify_threshold": None,
        "fallback_beams": None,
    }  # each model's own published values unless the job sets them

    def actor_options(generation: dict) -> SpeculativeOptions:
        config = load_config(
            overrides={"manifest": "m.jsonl", "output": "out", "model": str(tiny_model_dir), "generation": generation}
        )
        model = resolve_job_models(config)[0]
        return Transcriber(model, load_options(config, "cpu"), request_flags(config), "run").speech_model.speculative

    # Unset: granite-4.0-1b-speech's Open ASR leaderboard settings; set: IBM's notebook's, as the job says.
    assert actor_options({"decoding": "speculative"}) == SpeculativeOptions("speculative", 0.7, 0.2, 2)
    notebook = {"decoding": "speculative", "ctc_entropy_threshold": 0.7, "verify_threshold": 0.1, "fallback_beams": 1}
    assert actor_options(notebook) == SpeculativeOptions("speculative", 0.7, 0.1, 1)
    with pytest.raises(ValueError, match="num_beams 1"):
        GenerationOptions(decoding="speculative", num_beams=2)  # beams belong to the fallback


# --- the acceptance rules on hand-made distributions ---------------------------------------------


def test_ctc_draft_collapses_repeats_drops_blanks_and_reports_entropy():
    frames = torch.full((6, 128), -20.0)
    for frame, char in enumerate([ord("h"), ord("h"), 0, ord("i"), 0, ord("i")]):
        frames[frame, char] = 20.0
    text, entropy = ctc_draft(frames)
    assert text == "hii" and entropy < 1e-6
    frames[2] = 0.0  # one uniform frame: entropy log(128)
    assert ctc_draft(frames)[1] == pytest.approx(math.log(128), rel=1e-4)
    assert ctc_draft(torch.full((4, 8), 0.0).index_fill_(1, torch.tensor([0]), 9.0)) == ("", math.inf)


def test_strict_rule_accepts_up_to_the_first_disagreement():
    assert strict_accepted([5, 6, 7], [5, 6, 7]) == 3
    assert strict_accepted([5, 6, 7], [5, 9, 7]) == 1
    assert strict_accepted([5, 6, 7], [1, 6, 7]) == 0
    assert strict_accepted([], []) == 0


@pytest.mark.parametrize(
    "probabilities, threshold, verified",
    [
        ([0.9, 0.5, 0.2], 0.1, True),
        ([0.9, 0.05, 0.9], 0.1, False),
        ([0.1, 0.1], 0.1, True),
        ([0.09], 0.1, False),
        ([0.3, 0.25, 0.19], 0.2, False),
        ([], 0.0, False),
    ],
)
def test_relaxed_rule_needs_every_token_at_the_threshold(probabilities, threshold, verified):
    assert draft_verified(probabilities, threshold) == verified


def test_unknown_modes_and_beam_counts_are_refused():
    with pytest.raises(ValueError, match="speculative-prefix"):
        SpeculativeOptions("speculative-prefix")
    with pytest.raises(ValueError, match="fallback_beams"):
        SpeculativeOptions("speculative", fallback_beams=0)


@pytest.mark.slow
def test_job_with_strict_speculation_writes_the_same_text_and_counts_decisions(tmp_path, tiny_model_dir):
    import json

    import pyarrow.dataset as pads

    from conftest import run_cli

    texts = {}
    for mode in ("autoregressive", "speculative-strict"):
        out = tmp_path / mode
        result = run_cli(
            [
                "run",
                "--manifest",
                str(SAMPLES / "manifest.jsonl"),
                "--output",
                str(out),
                "--model",
                str(tiny_model_dir),
                "--max-new-tokens",
                "8",
                "--no-progress",
                "--decoding",
                mode,
                "--run-id",
                mode,
            ]
        )
        assert result.returncode == 0, result.stderr[-2000:]
        table = pads.dataset(out / "transcripts", format="parquet", partitioning="hive").to_table()
        texts[mode] = dict(zip(table.column("id").to_pylist(), table.column("text").to_pylist()))
        summary = json.loads((out / "runs" / f"{mode}.json").read_text())
        if mode == "speculative-strict":
            decoding = summary["decoding"]
            assert set(decoding) == {"en", "fr", "de", "es", "pt", "ja"}
            assert decoding["ja"] == {"autoregressive": 1}  # Japanese is never drafted
            # French: the translation row is not drafted, the transcription row is.
            assert decoding["fr"]["autoregressive"] == 1 and sum(decoding["fr"].values()) == 2
            assert sum(sum(c.values()) for c in decoding.values()) == 8
    assert texts["speculative-strict"] == texts["autoregressive"]


# --- per model: thresholds, and drafts only where IBM makes them -----------------------------------


def test_each_model_gets_ibms_thresholds_unless_the_job_sets_them(tiny_model_dir):
    from granite_batch.models.profiles import GRANITE_SPEECH, GRANITE_SPEECH_41, GRANITE_SPEECH_PLUS

    def options(profile, **given):
        speech_model = SpeechModel.load(
            str(tiny_model_dir),
            max_new_tokens=4,
            speculative=SpeculativeOptions("speculative", **given),
            profile=profile,
        )
        return speech_model.speculative

    # The leaderboard runs: 4.0 at 0.7 / 0.2 / 2 beams, 4.1 (BPE drafts) at 0.0 / 0.4 / 2 beams.
    assert options(GRANITE_SPEECH) == SpeculativeOptions("speculative", 0.7, 0.2, 2)
    assert options(None) == SpeculativeOptions("speculative", 0.7, 0.2, 2)
    assert options(GRANITE_SPEECH_41) == SpeculativeOptions("speculative", 0.0, 0.4, 2)
    assert options(GRANITE_SPEECH_41, verify_threshold=0.1) == SpeculativeOptions("speculative", 0.0, 0.1, 2)
    # A model that cannot draft decodes autoregressively whatever the job's mode.
    assert options(GRANITE_SPEECH_PLUS).mode == "autoregressive"


def test_only_the_raw_asr_prompt_is_drafted(tiny_model_dir, recordings):
    """IBM drafts and judges drafts under the raw ASR prompt only: a keyword row (or a translation) is
    decoded autoregressively, so relaxed mode never answers it with a draft made without its keywords."""
    samples = recordings[0][0]
    # The CTC head's own drafts, taken without the language model (threshold inf).
    relaxed = model(tiny_model_dir, "speculative", ctc_entropy_threshold=math.inf)
    items = [
        (samples, Request(language="en")),
        (samples, Request(language="en", keywords=("Granite",))),
        (samples, Request("ast", "fr", language="en")),
    ]
    decisions = [decision for _, decision in relaxed.generate_with_decisions(items)]
    assert decisions == [BY_CTC, BY_AUTOREGRESSIVE, BY_AUTOREGRESSIVE]
