"""Per-segment quality from what decoding already knows: loops, rates, pauses and confidences."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pyarrow as pa
import pytest

from conftest import REPO
from granite_batch.inference.escalation import BELOW_CONFIDENCE, escalation_reasons
from granite_batch.inference.quality import mark_language_mismatch
from granite_batch.models.quality import (
    PAUSE_S,
    chars_per_s,
    compression_ratio,
    emitted_logprob,
    longest_loop,
    rate_outlier,
    repetition,
    segment_quality,
    speech_ratio,
)
from granite_batch.schema import QUALITY_TYPE, SEGMENT_TYPE


def test_a_hand_made_repetition_loop_is_flagged_and_ordinary_speech_is_not():
    loop = "so I went to the market " + "and then we went home " * 5
    assert longest_loop(loop.split()) == (5, 5)
    assert repetition(loop, "en")
    assert repetition("thank you thank you thank you", "en")  # 2-gram x 3
    # A short emphasis, a stutter and ordinary sentences are no loop.
    assert not repetition("it was very very very cold", "en")
    assert not repetition("the the weather today is sunny with a light breeze from the west", "en")
    assert not repetition("The train to Lyon leaves the station at eight o'clock.", "en")
    # Languages written without spaces loop in characters.
    assert repetition("今日は" + "ありがとう" * 4, "ja")
    assert not repetition("今日はとても良い天気です。", "ja")


def test_text_that_compresses_like_a_loop_is_a_repetition_even_without_back_to_back_copies():
    # A 14-word sentence three times over: a loop longer than the n-grams looked for.
    sentence = "the committee will meet again on the first monday of next month to vote"
    text = " ".join([sentence] * 3)
    n, repeats = longest_loop(text.split())
    assert n * repeats < 6 or repeats < 3, (n, repeats)
    assert compression_ratio(text) > 2.4
    assert repetition(text, "en")
    assert compression_ratio("The weather today is sunny with a light breeze from the west.") < 2.4


def test_a_rate_outlier_is_flagged_in_both_directions_and_per_language():
    sentence = "The weather today is sunny with a light breeze from the west."  # 50 characters but spaces
    assert chars_per_s(sentence, 4.0) == pytest.approx(50 / 4.0, abs=1e-3)
    assert not rate_outlier(sentence, 4.0, "en")
    assert rate_outlier(sentence, 1.0, "en")  # 50 characters but spaces in one second: text invented beyond the audio
    assert rate_outlier("yes", 10.0, "en")  # three letters in ten seconds of speech: most of it dropped
    assert not rate_outlier("", 10.0, "en")  # nothing said is not an outlier
    assert not rate_outlier("yes", 0.5, "en")  # too short to judge
    # Japanese packs far more per character: 13 characters in 2 s is normal, 30 in 1.5 s is not.
    assert not rate_outlier("今日はとても良い天気です。", 2.0, "ja")
    assert rate_outlier("今日はとても良い天気です。" * 3, 1.5, "ja")
    assert rate_outlier("今日はとても良い天気です。" * 3, 1.5, "ja") != rate_outlier(
        "今日はとても良い天気です。" * 3, 1.5, "en"
    )


def test_speech_ratio_counts_long_blank_runs_as_pauses_and_short_ones_as_speech():
    frame_s = 0.04
    pause = round(PAUSE_S / frame_s)
    speech = [5, 0, 0, 7, 7, 0, 9]  # blanks between labels: running speech
    assert speech_ratio(speech, 0, frame_s) == 1.0
    path = [0] * pause + speech + [0] * (3 * pause)
    assert speech_ratio(path, 0, frame_s) == pytest.approx(len(speech) / len(path), abs=1e-4)
    assert speech_ratio([0] * 50, 0, frame_s) == 0.0
    assert speech_ratio([], 0, frame_s) is None


def test_ctc_confidence_is_the_mean_log_probability_of_the_frames_that_emit_a_label():
    frame_ids = [0, 4, 4, 0, 6, 0]
    logprobs = [-0.01, -0.2, -0.4, -0.02, -1.2, -0.05]
    assert emitted_logprob(frame_ids, logprobs, 0) == pytest.approx((-0.2 - 0.4 - 1.2) / 3, abs=1e-4)
    assert emitted_logprob([0, 0], [-0.1, -0.1], 0) is None


def test_a_segments_quality_and_the_reasons_it_would_be_escalated():
    loop = "and then we went home " * 5
    quality = segment_quality(loop, 1.0, "en", -1.5)
    assert quality.repetition and quality.rate and quality.low_confidence
    assert quality.flags(truncated=True) == ["low_confidence", "repetition", "truncated", "rate"]
    fine = segment_quality("The weather today is sunny.", 2.0, "en", -0.1, 0.8)
    assert fine.flags(truncated=False) == [] and fine.speech_ratio == 0.8 and fine.low_confidence is False
    assert segment_quality("", 2.0, "en", None).low_confidence is None
    row = {**vars(quality), "language_mismatch": None, "escalated_from": None, "escalated_for": None}
    assert escalation_reasons(row, True, -1.5, -1.0, ["repetition"]) == [BELOW_CONFIDENCE, "repetition"]
    assert escalation_reasons(row, True, -1.5, None, ["truncated", "rate"]) == ["truncated", "rate"]
    assert escalation_reasons(row, False, -1.5, -2.0, []) == []
    assert escalation_reasons(row, False, None, 0.0, []) == []  # no confidence: never below a threshold
    assert escalation_reasons(None, False, -1.5, 0.0, ["rate"]) == []  # not decoded


def test_language_mismatch_is_set_on_the_segments_of_rows_whose_identified_language_differs():
    quality = {name: None for name in QUALITY_TYPE.names}
    segment = {name: None for name in SEGMENT_TYPE.names} | {"text": "x", "quality": quality}
    table = pa.table(
        {
            "language": ["en", "en", "en", "fr"],
            "language_detected": ["fr", "en", None, "und"],
            "segments": pa.array([[segment, segment], [segment], [segment], [segment]], pa.list_(SEGMENT_TYPE)),
        }
    )
    marked = [
        [s["quality"]["language_mismatch"] for s in row]
        for row in mark_language_mismatch(table)["segments"].to_pylist()
    ]
    assert marked == [[True, True], [False], [None], [None]]


def test_the_quality_bench_reports_its_cost_per_segment():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_quality.py"), "--segments", "20"],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO / "jobs")},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    found = re.search(r"= ([\d.]+) ms; ([\d,]+)x real time on one core", result.stdout)
    assert found, result.stdout
    # The figures agree with each other (30 s segments), whatever the machine's speed.
    assert float(found.group(2).replace(",", "")) == pytest.approx(30 / (float(found.group(1)) / 1e3), rel=0.02)
