"""Measurement: how far the windowed VAD (`segment.speech_probabilities`) is from silero's own
continuous pass, and what that moves in the segments.

    python benchmarks/bench_vad_agreement.py [--minutes 10]

The windowed pass runs each recording as windows of 4-16 s side by side, each after 0.5 s of the
audio before it, so the model's state restarts at every window; silero's `get_speech_timestamps`
steps one state through the whole recording. This computes both on the sample recordings and on a
long synthetic one (the samples' sentences in five languages between pauses of 0.05-3 s over a
faint noise floor), then compares frame probabilities, speech regions (`speech_regions`) and the
planned segments (`plan_segments`, 30 s). Not a test: it only reports.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from granite_batch.audio.decode import load_recording
from granite_batch.audio.segment import plan_segments
from granite_batch.audio.vad import VAD_FRAME, VAD_RATE_HZ, VadOptions, speech_probabilities, speech_regions, vad_model

SAMPLES = Path(__file__).resolve().parents[1] / "samples"
NAMES = ["en_weather.flac", "fr_gare.mp3", "de_bibliothek.ogg", "pt_praia.wav", "es_mercado.m4a", "ja_tenki.flac"]
PAUSES_S = (0.05, 0.3, 0.09, 0.8, 1.5, 0.05, 0.4, 3.0, 0.6)


def continuous_probabilities(samples: np.ndarray) -> np.ndarray:
    """Silero's own pass, as `get_speech_timestamps` makes it: one state, 512-sample steps, the
    last step zero-padded."""
    import torch

    model = vad_model()
    model.reset_states()
    padded = np.zeros(-(-len(samples) // VAD_FRAME) * VAD_FRAME, np.float32)
    padded[: len(samples)] = samples
    with torch.inference_mode():
        return np.array(
            [
                float(model(torch.from_numpy(padded[i : i + VAD_FRAME]), VAD_RATE_HZ))
                for i in range(0, len(padded), VAD_FRAME)
            ],
            np.float32,
        )


def long_recording(minutes: float) -> np.ndarray:
    rng = np.random.default_rng(0)
    sentences = []
    for name in NAMES:
        samples = load_recording(str(SAMPLES / name)).samples
        loud = np.flatnonzero(np.abs(samples) > 3e-3)
        sentences.append(samples[loud[0] : loud[-1] + 1])
    parts, total, i = [], 0, 0
    while total < minutes * 60 * VAD_RATE_HZ:
        parts.append(sentences[i % len(sentences)])
        parts.append(np.zeros(int(PAUSES_S[i % len(PAUSES_S)] * VAD_RATE_HZ), np.float32))
        total += len(parts[-2]) + len(parts[-1])
        i += 1
    samples = np.concatenate(parts)
    return samples + rng.normal(0, 1e-3, len(samples)).astype(np.float32)


def boundary_shifts(ours: list[tuple[int, int]], theirs: list[tuple[int, int]]) -> list[float]:
    """For each boundary of `theirs`, the distance in seconds to the nearest boundary of `ours`."""
    mine = np.array([b for bound in ours for b in bound] or [0])
    return [float(np.abs(mine - b).min()) / VAD_RATE_HZ for bound in theirs for b in bound]


def compare(name: str, samples: np.ndarray, max_segment_s: float) -> dict:
    started = time.perf_counter()
    windowed = speech_probabilities(samples)
    windowed_s = time.perf_counter() - started
    started = time.perf_counter()
    continuous = continuous_probabilities(samples)
    continuous_s = time.perf_counter() - started
    difference = np.abs(windowed - continuous)
    options = VadOptions()
    regions = [speech_regions(p, len(samples), options) for p in (windowed, continuous)]
    segments = [plan_segments(samples, VAD_RATE_HZ, max_segment_s, options, p) for p in (windowed, continuous)]
    shifts = boundary_shifts(segments[0], segments[1])
    return {
        "recording": name,
        "seconds": round(len(samples) / VAD_RATE_HZ, 1),
        "frames": len(windowed),
        "max_probability_difference": round(float(difference.max()), 3),
        "frames_differing_by_0.1": int((difference > 0.1).sum()),
        "frames_on_other_side_of_0.5": int(((windowed >= 0.5) != (continuous >= 0.5)).sum()),
        "regions": [len(r) for r in regions],
        "region_boundary_shifts_max_s": round(max(boundary_shifts(regions[0], regions[1]) or [0]), 3),
        "segments": [len(s) for s in segments],
        "segment_boundaries_moved": sum(shift > 0 for shift in shifts),
        "segment_boundary_shift_max_s": round(max(shifts or [0]), 3),
        "windowed_s": round(windowed_s, 2),
        "continuous_s": round(continuous_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--max-segment-s", type=float, default=30.0)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)  # as the VAD runs in the job
    for name in NAMES:
        print(json.dumps(compare(name, load_recording(str(SAMPLES / name)).samples, args.max_segment_s)))
    print(json.dumps(compare(f"synthetic {args.minutes:g} min", long_recording(args.minutes), args.max_segment_s)))


if __name__ == "__main__":
    main()
