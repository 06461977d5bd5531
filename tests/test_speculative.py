"""Self-speculative decoding: strict mode is lossless, verification is one pass, relaxed mode keeps its thresholds."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import SAMPLES
from granite_batch.audio import load_recording
from granite_batch.model import SpeechModel
from granite_batch.prompts import Request
from granite_batch.speculative import (
    BY_AUTOREGRESSIVE,
    BY_FALLBACK,
    BY_VERIFICATION,
    SpeculativeOptions,
    ctc_draft,
    relaxed_accepted,
    strict_accepted,
)

MAX_NEW = 24


@pytest.fixture(scope="module")
def recordings():
    names = ["en_weather.flac", "fr_gare.mp3", "pt_praia.wav", "de_bibliothek.ogg", "es_mercado.m4a"]
    return [(load_recording(str(SAMPLES / n)).samples, Request(language=n[:2])) for n in names]


def model(tiny_model_dir, mode: str, drafter=None, **options) -> SpeechModel:
    return SpeechModel.load(str(tiny_model_dir), max_new_tokens=MAX_NEW,
                            speculative=SpeculativeOptions(mode, **options), drafter=drafter)


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


def test_a_draft_right_for_a_prefix_resumes_at_the_first_wrong_token(tiny_model_dir, recordings, greedy,
                                                                       monkeypatch):
    index = max(range(len(recordings)), key=lambda i: len(greedy[1][i]))
    right = greedy[1][index]
    assert len(right) >= 8
    keep = 5
    drafts = []
    strict = model(tiny_model_dir, "speculative-strict", drafter=lambda samples, request: drafts[0])
    wrong = (right[keep] + 1) % len(strict.tokenizer)
    drafts.append(right[:keep] + [wrong] + right[keep + 1:])
    seen = []
    original = strict._autoregressive

    def spy(sequences, budgets):
        seen.extend(budgets)
        return original(sequences, budgets)

    monkeypatch.setattr(strict, "_autoregressive", spy)
    text, decision = strict.generate_with_decisions([recordings[index]])[0]
    assert text == greedy[0][index] and decision == BY_FALLBACK
    # 5 draft tokens accepted plus the model's own 6th: decoding resumed with 6 tokens fewer to go.
    assert seen == [MAX_NEW - (keep + 1)]


def test_translation_and_japanese_are_not_drafted(tiny_model_dir, recordings, monkeypatch):
    strict = model(tiny_model_dir, "speculative-strict",
                   drafter=lambda samples, request: pytest.fail("no draft expected"))
    samples = recordings[0][0]
    results = strict.generate_with_decisions([(samples, Request("ast", "fr", language="en")),
                                              (samples, Request(language="ja"))])
    assert [decision for _, decision in results] == [BY_AUTOREGRESSIVE, BY_AUTOREGRESSIVE]


def test_relaxed_mode_accepts_a_confident_ctc_draft_without_the_language_model(tiny_model_dir, recordings,
                                                                              monkeypatch):
    relaxed = model(tiny_model_dir, "speculative", ctc_entropy_threshold=math.inf)
    counter = ForwardCounter(relaxed, monkeypatch)
    results = relaxed.generate_with_decisions(recordings[:2])
    drafted = [decision for _, decision in results]
    # The tiny CTC head emits some non-blank characters for real speech, so its drafts are taken.
    assert drafted == ["ctc", "ctc"] and counter.calls == 0


def test_speculative_modes_need_greedy_search(tiny_model_dir):
    with pytest.raises(ValueError, match="greedy"):
        SpeechModel.load(str(tiny_model_dir), num_beams=2, speculative=SpeculativeOptions("speculative-strict"))


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
    "probabilities, threshold, accepted",
    [([0.9, 0.5, 0.2], 0.1, 3), ([0.9, 0.05, 0.9], 0.1, 1), ([0.1, 0.1], 0.1, 2), ([0.09], 0.1, 0),
     ([0.3, 0.25, 0.19], 0.2, 2)],
)
def test_relaxed_rule_respects_its_threshold(probabilities, threshold, accepted):
    assert relaxed_accepted(probabilities, threshold) == accepted


def test_job_with_strict_speculation_writes_the_same_text_and_counts_decisions(tmp_path, tiny_model_dir):
    import json

    import pyarrow.dataset as pads

    from conftest import run_cli

    texts = {}
    for mode in ("autoregressive", "speculative-strict"):
        out = tmp_path / mode
        result = run_cli(["run", "--manifest", str(SAMPLES / "manifest.jsonl"), "--output", str(out),
                          "--model", str(tiny_model_dir), "--max-new-tokens", "8", "--no-progress",
                          "--decoding", mode, "--run-id", mode])
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
