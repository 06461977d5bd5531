"""Word times from CTC posteriors: forced alignment of a known path, the greedy path of CTC models,
and text the head cannot spell (digits, Japanese, symbols), which degrades but never fails."""

from __future__ import annotations

import math

import pytest
import torch

from granite_batch.models.alignment import (
    align_words,
    encoder_frame_s,
    proportional_words,
    split_words,
    words_from_ctc_path,
)

CLASSES = 256  # byte values, as IBM's head (class c is chr(c), 0 the blank)
FRAME_S = 0.02


def posteriors(path: str, classes: int = CLASSES, peak: float = 0.9) -> torch.Tensor:
    """Log-posteriors whose best path is `path`: one character per frame, `_` the blank."""
    rows = []
    for char in path:
        label = 0 if char == "_" else ord(char)
        row = torch.full((classes,), (1 - peak) / (classes - 1))
        row[label] = peak
        rows.append(row.log())
    return torch.stack(rows)


def times(words):
    return [(w.text, w.start, w.end) for w in words]


def test_known_path_gives_each_word_its_frames():
    #               0123456789012345
    emission = posteriors("_hh_i_ _yo_o_ ab")
    words = align_words(emission, "hi yoo ab", FRAME_S, start_s=10.0)
    assert times(words) == [("hi", 10.02, 10.10), ("yoo", 10.16, 10.24), ("ab", 10.28, 10.32)]
    assert all(w.confidence == pytest.approx(0.9, abs=1e-3) for w in words)


def test_case_and_punctuation_follow_the_spelled_letters():
    emission = posteriors("_hh_i_ _yo_o_ ab")
    words = align_words(emission, "Hi, YOO ab.", FRAME_S, start_s=10.0)
    assert times(words) == [("Hi,", 10.02, 10.10), ("YOO", 10.16, 10.24), ("ab.", 10.28, 10.32)]


def test_a_word_the_head_cannot_spell_takes_the_speech_between_its_neighbours():
    # "42" spoken as "forty two": the wildcard takes those frames, its neighbours keep theirs.
    emission = posteriors("_hi_ _forty_two_ _yo__")
    words = align_words(emission, "hi 42 yo", FRAME_S)
    assert times(words) == [("hi", 0.02, 0.06), ("42", 0.12, 0.30), ("yo", 0.36, 0.40)]
    assert words[1].confidence is None and words[0].confidence == pytest.approx(0.9, abs=1e-3)


def test_low_posteriors_give_low_confidence():
    clear = align_words(posteriors("_hi_"), "hi", FRAME_S)[0]
    unsure = align_words(posteriors("_hi_", peak=0.3), "hi", FRAME_S)[0]
    assert unsure.confidence < clear.confidence
    assert unsure.confidence == pytest.approx(0.3, abs=0.01)


def test_japanese_and_symbols_align_as_wildcards_without_error():
    emission = posteriors("_konnichiwa_ _sekai___")
    text = "こんにちは、世界。"
    words = align_words(emission, text, FRAME_S, start_s=1.0, end_s=1.44)
    assert [w.text for w in words] == ["こんにちは、", "世界。"]
    assert all(1.0 <= w.start < w.end <= 1.44 for w in words)
    assert words[0].end <= words[1].start
    symbols = align_words(posteriors("_a__nd__b_"), "a & b", FRAME_S)
    assert [w.text for w in symbols] == ["a", "&", "b"]
    assert all(w.start < w.end for w in symbols)


def test_more_text_than_frames_falls_back_to_proportional_times():
    words = align_words(posteriors("_ab_"), "a much longer text than four frames", FRAME_S, start_s=2.0, end_s=3.0)
    assert [w.text for w in words] == "a much longer text than four frames".split()
    assert words[0].start == 2.0 and words[-1].end == pytest.approx(3.0)
    assert all(w.start < w.end and w.confidence is None for w in words)
    assert all(a.end == pytest.approx(b.start, abs=1e-3) for a, b in zip(words, words[1:]))


def test_no_posteriors_and_no_text():
    assert align_words(None, "", FRAME_S) == []
    assert times(align_words(None, "one three", FRAME_S, 0.0, 0.8)) == [("one", 0.0, 0.3), ("three", 0.3, 0.8)]
    assert proportional_words([], 0, 1) == []


def test_split_words_rejoins_to_the_text():
    for text in ["  Hello,   world  ", "今日は、いい天気です。明日も", "mixed 東京 words"]:
        assert "".join(split_words(text)) == "".join(text.split())


def test_greedy_ctc_path_of_characters():
    pieces = [chr(c) for c in range(CLASSES)]
    path = [ord(c) if c != "_" else 0 for c in "_hh_i_ _yo_o__"]
    words = words_from_ctc_path(path, pieces, FRAME_S, start_s=5.0, frame_probs=[0.5] * len(path))
    assert times(words) == [("hi", 5.02, 5.10), ("yoo", 5.16, 5.24)]
    assert all(w.confidence == 0.5 for w in words)


def test_greedy_ctc_path_of_word_pieces():
    pieces = ["<blank>", "▁the", "▁gre", "en", "▁man", "go"]
    #       frames: 0  1  2  3  4  5  6  7  8
    path = [0, 1, 1, 0, 2, 3, 0, 4, 5]
    words = words_from_ctc_path(path, pieces, 0.08, blank_id=0)
    assert times(words) == [("the", 0.08, 0.24), ("green", 0.32, 0.48), ("mango", 0.56, 0.72)]
    assert all(w.confidence is None for w in words)
    assert words_from_ctc_path([0, 0, 0], pieces, 0.08) == []


def test_encoder_frames_are_two_mel_hops(tiny_model_dir):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(tiny_model_dir))
    assert encoder_frame_s(processor.audio_processor) == pytest.approx(0.02)
    assert math.isfinite(encoder_frame_s(processor.audio_processor))
