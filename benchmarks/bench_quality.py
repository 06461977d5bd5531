"""Benchmark: what the per-segment quality fields cost on the model actor's CPU.

    python benchmarks/bench_quality.py [--words 90] [--segments 2000]

Times `models.quality.segment_quality` (loop search, compression ratio, rate) on segments of random
English words, the length of a 30-second segment of speech, and the CTC speech ratio on a frame path
of that length; prints milliseconds per segment and the real-time factor that alone would allow on
one core. Not a test: it only reports (run it with the machine's load in mind, `uptime`).
"""

from __future__ import annotations

import argparse
import random
import time

from granite_batch.models.quality import segment_quality, speech_ratio

WORDS = "the weather today is sunny with a light breeze from the west and it will rain tomorrow in the north".split()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--words", type=int, default=90, help="words per segment (about 30 s of speech)")
    parser.add_argument("--segments", type=int, default=2000)
    parser.add_argument("--segment-s", type=float, default=30.0)
    args = parser.parse_args()
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(args.words)) for _ in range(args.segments)]
    frame_s = 0.08
    paths = [[rng.choice([0, 0, 0, 5, 9]) for _ in range(int(args.segment_s / frame_s))] for _ in range(args.segments)]
    start = time.perf_counter()
    for text in texts:
        segment_quality(text, args.segment_s, "en", -0.2)
    text_s = (time.perf_counter() - start) / args.segments
    start = time.perf_counter()
    for path in paths:
        speech_ratio(path, 0, frame_s)
    frames_s = (time.perf_counter() - start) / args.segments
    each = text_s + frames_s
    print(
        f"quality of a {args.segment_s:g} s segment of {args.words} words: {text_s * 1e3:.3f} ms (text) + "
        f"{frames_s * 1e3:.3f} ms (CTC speech ratio) = {each * 1e3:.3f} ms; "
        f"{args.segment_s / each:,.0f}x real time on one core"
    )


if __name__ == "__main__":
    main()
