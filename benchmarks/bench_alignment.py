"""Benchmark: what word timestamps cost per audio hour (alignment.align_words), CPU or GPU.

    PYTHONPATH=jobs python benchmarks/bench_alignment.py [--segment-s 10 30] [--segments 40] [--device cpu]

For segments of each length it builds the CTC head's output as granite-4.0-1b-speech has it (348
classes, one frame per 20 ms: its published config.json) and an English text at a fast speaking rate (15
characters a second, about 170 words a minute), then times what the model actor adds per segment
when `word_timestamps` is on: the log-softmax of the head's logits and `align_words` (emission
columns, `torchaudio.functional.forced_align`, word spans). The posteriors are random: the Viterbi
pass costs the same whatever the values (frames x targets). Not included: the CTC head itself, a
1024 -> 348 linear layer over the encoder output (with speculative decoding it runs anyway).

Not a test: it only reports. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import statistics
import time

import torch

from granite_batch.models.alignment import align_words

CLASSES = 348
FRAME_S = 0.02
CHARS_PER_S = 15.0
VOCABULARY = (
    "the weather today is mild with a light breeze from west tomorrow brings rain in morning and "
    "sunshine after lunch so take an umbrella when you leave house early fishermen along coast "
    "expect calm water until thursday storm atlantic arrives 1999 42 percent"
).split()


def english(chars: int, rng: random.Random) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(VOCABULARY))
    return " ".join(words).capitalize() + "."


def time_segments(segment_s: float, segments: int, device: str, rng: random.Random) -> dict:
    frames = int(segment_s / FRAME_S)
    logits = [torch.randn(frames, CLASSES, device=device) * 4 for _ in range(segments)]
    texts = [english(int(segment_s * CHARS_PER_S), rng) for _ in range(segments)]
    align_words(torch.log_softmax(logits[0], dim=-1), texts[0], FRAME_S)  # warm-up: imports, kernels
    seconds = []
    words = 0
    for row_logits, text in zip(logits, texts):
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        aligned = align_words(torch.log_softmax(row_logits.float(), dim=-1), text, FRAME_S, 0.0, segment_s)
        if device == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
        words += len(aligned)
    per_segment = statistics.median(seconds)
    return {
        "segment_s": segment_s,
        "segments": segments,
        "frames": frames,
        "words_per_segment": words / segments,
        "median_ms_per_segment": round(per_segment * 1000, 2),
        "max_ms_per_segment": round(max(seconds) * 1000, 2),
        "s_per_audio_hour": round(per_segment * 3600 / segment_s, 2),
        "share_of_audio_time": round(per_segment / segment_s, 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--segment-s", type=float, nargs="+", default=[10.0, 30.0])
    parser.add_argument("--segments", type=int, default=40)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the model actor's share)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    results = [time_segments(s, args.segments, args.device, rng) for s in args.segment_s]
    for r in results:
        print(
            f"{r['segment_s']:>5.0f} s segments, {r['words_per_segment']:.0f} words: "
            f"{r['median_ms_per_segment']:.1f} ms each (max {r['max_ms_per_segment']:.1f}), "
            f"{r['s_per_audio_hour']:.1f} s per audio hour on {args.device}"
        )
    print(
        json.dumps(
            {
                "device": args.device,
                "threads": args.threads,
                "torch": torch.__version__,
                "machine": platform.processor() or platform.machine(),
                "results": results,
            }
        )
    )


if __name__ == "__main__":
    main()
