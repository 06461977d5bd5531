"""Long recordings are cut into segments no longer than the limit, in pauses."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from conftest import SAMPLES
from granite_batch.audio import load_recording, samples_to_arrow
from granite_batch.segment import plan_segments, segment_table

RATE = 16000


def speech_with_pauses(seconds_of_speech: list[float], pause_s: float = 0.6) -> tuple[np.ndarray, list[tuple]]:
    """Real speech clips separated by silences; returns the samples and where the silences are."""
    clip = load_recording(str(SAMPLES / "en_weather.flac")).samples
    parts, pauses, position = [], [], 0
    for seconds in seconds_of_speech:
        n = int(seconds * RATE)
        parts.append(np.resize(clip, n))
        position += n
        parts.append(np.zeros(int(pause_s * RATE), np.float32))
        pauses.append((position, position + int(pause_s * RATE)))
        position += int(pause_s * RATE)
    return np.concatenate(parts), pauses


def test_short_recording_stays_whole():
    samples = np.ones(RATE * 10, np.float32)
    assert plan_segments(samples, RATE, 30.0) == [(0, RATE * 10)]


def test_long_recording_is_tiled_by_segments_within_the_limit_cut_in_pauses():
    samples, pauses = speech_with_pauses([8, 9, 7, 12, 6, 10, 9, 11, 8])
    bounds = plan_segments(samples, RATE, 30.0)
    assert bounds[0][0] == 0 and bounds[-1][1] == len(samples)
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # contiguous, nothing lost
    assert all(end - start <= 30 * RATE for start, end in bounds)
    # Every cut falls where the signal is quiet: the 20 ms around it hold far less energy than
    # typical speech (the inserted pauses, or a pause inside the spoken clip itself).
    frame = int(0.02 * RATE)
    frames = np.square(samples[: len(samples) // frame * frame]).reshape(-1, frame).mean(axis=1)
    typical_speech = np.median(frames[frames > 0])
    for _, cut in bounds[:-1]:
        around = np.square(samples[cut - frame // 2 : cut + frame // 2]).mean()
        assert around < 0.01 * typical_speech, f"cut at {cut / RATE:.2f} s is not in a quiet region"


def test_speech_without_pauses_is_still_cut_within_the_limit():
    samples = np.resize(load_recording(str(SAMPLES / "en_weather.flac")).samples, RATE * 95)
    bounds = plan_segments(samples, RATE, 20.0)
    assert all(end - start <= 20 * RATE for start, end in bounds) and bounds[-1][1] == len(samples)


def test_segment_stage_skips_rows_without_samples():
    table = pa.table({"samples": samples_to_arrow([np.ones(RATE * 50, np.float32), None])})
    out = segment_table(table, RATE, 30.0)
    assert len(out.column("segment_starts")[0].as_py()) == 2
    assert out.column("segment_starts")[1].as_py() is None
