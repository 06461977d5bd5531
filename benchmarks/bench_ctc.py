"""Throughput of the CTC engine (granite_speech5_ctc) on a GPU: one segment at a time against batches.

A standalone script for a machine with torch, torchaudio, numpy and transformers 5.24; no Ray, no
network, no weights. It builds GraniteSpeech5ForCTC at the published granite-speech-5.0-470m-turboctc
size (transformers' default GraniteSpeech5EncoderConfig: 16 layers, hidden 1024, 16,384 BPE units)
with random weights; a CTC model does the same work whatever its weights, so the timing is the real
model's. It reports RTFx (audio seconds / wall seconds, as the Open ASR leaderboard counts it) and peak
GPU memory for:

- `alone`: `granite_batch.models.ctc.CtcSpeechModel.generate_segments` one segment per call;
- `batched`: the same with `batch` segments per call (features per segment on the device, padded
  under the encoder's mask; the model's own `generate`).

It checks that every batched text equals its one-at-a-time text. From the repository root:

    PYTHONPATH=jobs python3 benchmarks/bench_ctc.py                        # GPU: published size
    PYTHONPATH=jobs python3 benchmarks/bench_ctc.py --tiny --device cpu    # tiny dims (smoke test)

The last line printed is one JSON object with every figure. IBM's blog reports over 12,600 RTFx on one
H200 for granite-speech-5.0-470m-turboctc with its own batched inference.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import make_clips  # noqa: E402  (the same clips as the LLM benchmark)
from granite_batch.models.ctc import CtcSpeechModel
from granite_batch.models.prompts import Request
from granite_batch.testing.tiny_model import build_ctc_tokenizer


def build(tiny: bool, device: str, dtype: torch.dtype) -> CtcSpeechModel:
    from transformers import (
        GraniteSpeech5CTCConfig,
        GraniteSpeech5EncoderConfig,
        GraniteSpeech5FeatureExtractor,
        GraniteSpeech5ForCTC,
        GraniteSpeech5Processor,
    )

    tokenizer = build_ctc_tokenizer()
    if tiny:
        encoder = GraniteSpeech5EncoderConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            context_size=64,
            max_position_embeddings=64,
        )
    else:
        encoder = GraniteSpeech5EncoderConfig()  # the published size (16,384 units)
    config = GraniteSpeech5CTCConfig(vocab_size=encoder.vocab_size, encoder_config=encoder, pad_token_id=0)
    torch.manual_seed(0)
    model = GraniteSpeech5ForCTC(config).to(device=device, dtype=dtype).eval()
    processor = GraniteSpeech5Processor(feature_extractor=GraniteSpeech5FeatureExtractor(), tokenizer=tokenizer)
    return CtcSpeechModel(model, processor, device, max_batch_audio_s=1e9)


def timed(device: str, work) -> tuple[float, object]:
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    result = work()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny dimensions and a few short clips (smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--clips", type=int, help="segments (default 1024; 12 with --tiny)")
    parser.add_argument("--min-s", type=float, default=2.0)
    parser.add_argument("--max-s", type=float, default=30.0)
    parser.add_argument("--alone-clips", type=int, help="segments run one at a time (default 64; 4 with --tiny)")
    parser.add_argument("--batch-sizes", help="comma-separated (default 64,256; 4 with --tiny)")
    args = parser.parse_args(argv)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    clips = make_clips(args.clips or (12 if args.tiny else 1024), args.min_s, 3.0 if args.tiny else args.max_s)
    batch_sizes = [int(b) for b in (args.batch_sizes or ("4" if args.tiny else "64,256")).split(",")]
    speech_model = build(args.tiny, device, dtype)
    items = [(clip, Request(language="en")) for clip in clips]
    audio_s = sum(len(clip) for clip in clips) / 16000
    speech_model.max_batch_segments = 1
    speech_model.generate_segments(items[:2])  # warm-up
    few = items[: args.alone_clips or (4 if args.tiny else 64)]
    wall, alone = timed(device, lambda: speech_model.generate_segments(few))
    report = {
        "device": torch.cuda.get_device_name() if device.startswith("cuda") else "cpu",
        "dtype": str(dtype),
        "parameters": sum(p.numel() for p in speech_model.model.parameters()),
        "segments": len(items),
        "audio_s": round(audio_s, 1),
        "alone": {"segments": len(few), "rtfx": round(sum(len(c) for c, _ in few) / 16000 / wall, 1)},
    }
    for batch in batch_sizes:
        speech_model.max_batch_segments = batch
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        wall, results = timed(device, lambda: speech_model.generate_segments(items))
        same = [r.text for r in results[: len(few)]] == [r.text for r in alone]
        report[f"batch_{batch}"] = {
            "rtfx": round(audio_s / wall, 1),
            "wall_s": round(wall, 3),
            "batched_equals_alone": same,
            "padding_fraction": round(
                sum(r.padded_positions for r in results) / max(1, sum(r.positions for r in results)), 4
            ),
            "peak_gpu_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if device.startswith("cuda") else None,
        }
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
