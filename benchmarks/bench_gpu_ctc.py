"""GPU throughput of TurboCTC (granite-speech-5.0-470m-turboctc): the card's flow and the job's.

A standalone script for a GPU machine with torch, numpy and transformers (5.24, which has
`granite_speech5_ctc`) and nothing else: no Ray, no network, no weights. It builds the TurboCTC
architecture (transformers' `GraniteSpeech5EncoderConfig` defaults, which are the published model's:
16 conformer layers of 1024, 16,384 BPE units, ~470 M parameters, checked below) with random weights,
a `ParakeetTokenizer` of the full vocabulary (the class the real checkpoint loads), and the real
`GraniteSpeech5Processor`. The blank's bias is set so that a chosen share of frames emit a token
(`--tokens-per-s`, 4 by default, about English speech), so the host-side decoding does a real
transcript's work. It reports RTFx (audio seconds / wall seconds, as the Open ASR leaderboard counts
it; IBM's blog reports above 12,600 for this model on one H200) and peak GPU memory for:

- `card`: one clip at a time, `processor(...)` -> `model.generate(...)` -> `processor.batch_decode(...)`,
  the model card's flow;
- `card-batch`: the same on a list of clips (`padding=True`), at each batch size;
- `ours`: `granite_batch.models.ctc.CtcSpeechModel.generate_segments` (each segment's features as its
  own processor call makes them, in one pass per batch on the device; one padded encoder call; the
  greedy path collapsed once and decoded), fed as the job's model
  actor is (4 calls' worth of segments at a time), and the same with word times (`ours-words`);
- a split of `ours` at its best batch size: features alone, and features + encoder (no host decode),
  so the share of each step is read off one run.

From the repository root (granite-batch need not be installed; only models/ is imported):

    PYTHONPATH=jobs python3 benchmarks/bench_gpu_ctc.py                       # H200: about 2 minutes
    PYTHONPATH=jobs python3 benchmarks/bench_gpu_ctc.py --tiny --device cpu   # tiny dims (smoke test)

The last line printed is one JSON object with every figure (unrounded).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_gpu import SAMPLE_RATE_HZ, make_clips, synchronize  # noqa: E402
from granite_batch.models.ctc import CtcSpeechModel  # noqa: E402
from granite_batch.models.ctc_features import batch_features  # noqa: E402
from granite_batch.models.prompts import Request  # noqa: E402

BLANK = "<|blank|>"  # id 0, the pad token, as convert_granite_speech5_to_hf.py builds the tokenizer


def build_tokenizer(vocab_size: int):
    """A `ParakeetTokenizer` over a byte-level BPE vocabulary of exactly `vocab_size` ids (blank first,
    the 256 byte symbols, then made-up word pieces): every id the random model emits decodes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import ParakeetTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {BLANK: 0}
    for symbol in alphabet:
        vocab[symbol] = len(vocab)
    letters = "abcdefghijklmnopqrstuvwxyz"
    n = 0
    while len(vocab) < vocab_size:
        piece = ("Ġ" if n % 3 == 0 else "") + letters[n % 26] + letters[(n // 26) % 26] + str(n // 676)
        vocab.setdefault(piece, len(vocab))
        n += 1
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    return ParakeetTokenizer(tokenizer_object=backend, pad_token=BLANK)


def build(tiny: bool, device: str, dtype: torch.dtype):
    """(model, processor): the real classes, random weights, on `device`."""
    from transformers import (
        GraniteSpeech5CTCConfig,
        GraniteSpeech5EncoderConfig,
        GraniteSpeech5FeatureExtractor,
        GraniteSpeech5ForCTC,
        GraniteSpeech5Processor,
    )

    sizes = (
        {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4} if tiny else {}
    )
    vocab_size = 1024 if tiny else GraniteSpeech5EncoderConfig().vocab_size
    tokenizer = build_tokenizer(vocab_size)
    encoder = GraniteSpeech5EncoderConfig(vocab_size=vocab_size, **sizes)
    config = GraniteSpeech5CTCConfig(vocab_size=vocab_size, encoder_config=encoder, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = GraniteSpeech5ForCTC(config).to(dtype).eval()
    processor = GraniteSpeech5Processor(feature_extractor=GraniteSpeech5FeatureExtractor(), tokenizer=tokenizer)
    return model, processor


def set_blank_bias(model, processor, clips, device: str, tokens_per_s: float) -> float:
    """Raise the blank's bias so that about `tokens_per_s` frames per audio second are not blank (a
    trained CTC model's shape: mostly blank, a token now and then). Returns the share of frames."""
    speech = CtcSpeechModel(model, processor, device)
    share = min(1.0, tokens_per_s * speech.frame_s)
    margins = []
    with torch.inference_mode():
        for clip in clips:
            features = processor.feature_extractor(
                torch.tensor(clip), sampling_rate=SAMPLE_RATE_HZ, return_tensors="pt", device=device
            )
            logits = (
                model(
                    input_features=features["input_features"].to(model.dtype), attention_mask=features["attention_mask"]
                )
                .logits[0]
                .float()
            )
            margins.append((logits[:, 1:].max(dim=-1).values - logits[:, 0]).cpu())
        bias = float(torch.quantile(torch.cat(margins), 1.0 - share)) if share < 1.0 else 0.0
        model.ctc_head.bias[0] += bias
    return share


def card(model, processor, clips, device: str) -> list[str]:
    texts = []
    for clip in clips:
        inputs = processor(clip, sampling_rate=SAMPLE_RATE_HZ, return_tensors="pt").to(device)
        inputs["input_features"] = inputs["input_features"].to(model.dtype)
        texts += processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)
    return texts


def card_batches(model, processor, clips, device: str, batch_size: int) -> list[str]:
    texts = []
    for start in range(0, len(clips), batch_size):
        batch = list(clips[start : start + batch_size])
        inputs = processor(batch, sampling_rate=SAMPLE_RATE_HZ, return_tensors="pt", padding=True).to(device)
        inputs["input_features"] = inputs["input_features"].to(model.dtype)
        texts += processor.batch_decode(model.generate(**inputs), skip_special_tokens=True)
    return texts


def ours(speech: CtcSpeechModel, clips, batch_size: int, words: bool = False) -> list[str]:
    """As the model actor is fed: 4 calls' worth of segments at a time, sorted and cut by the engine."""
    speech.max_batch_segments = batch_size
    request = Request(language="en")
    texts = []
    for start in range(0, len(clips), 4 * batch_size):
        chunk = [(clip, request) for clip in clips[start : start + 4 * batch_size]]
        texts += [r.text for r in speech.generate_segments(chunk, posteriors=words)]
    return texts


def features_only(speech: CtcSpeechModel, clips, batch_size: int) -> None:
    """The features `ours` makes (ctc_features.batch_features), in the same length-sorted batches."""
    from granite_batch.models.batching import length_batches

    for start in range(0, len(clips), 4 * batch_size):
        chunk = clips[start : start + 4 * batch_size]
        limit = speech.max_batch_audio_s * speech.sample_rate_hz
        for batch in length_batches([len(c) for c in chunk], batch_size, limit):
            batch_features(speech.feature_extractor, [chunk[i] for i in batch], speech.device, speech.model.dtype)


def encoder_only(speech: CtcSpeechModel, clips, batch_size: int) -> int:
    """Features and the padded encoder call with the model's argmax, as `ours` makes them; no host
    decode. Returns the number of greedy paths made (device work and one copy to the host each)."""
    speech.max_batch_segments = batch_size
    request = Request(language="en")
    made = 0
    for start in range(0, len(clips), 4 * batch_size):
        for _batch, paths in speech._decoded_batches([(c, request) for c in clips[start : start + 4 * batch_size]]):
            made += len(paths)
    return made


def host_decode_us(speech: CtcSpeechModel, segments: int = 1024, share: float = 0.32) -> dict:
    """Microseconds of host work per segment on made-up greedy paths (2-30 s, `share` of frames emitting,
    ids over the whole vocabulary): collapse, text, confidence and speech ratio, with the job's decode
    (`decode_ids`) and with ParakeetTokenizer's own `decode(group_tokens=False)`. The best of 3."""
    from granite_batch.models.ctc import collapse
    from granite_batch.models.quality import emitted_logprob, speech_ratio

    rng = np.random.default_rng(1)
    paths = []
    for _ in range(segments):
        frames = int(rng.uniform(2.0, 30.0) / speech.frame_s)
        ids = np.where(rng.random(frames) < share, rng.integers(1, len(speech.tokenizer), frames), 0).tolist()
        paths.append((ids, (-rng.random(frames)).tolist()))

    def run(decode) -> float:
        start = time.perf_counter()
        for ids, logprobs in paths:
            decode(collapse(ids, speech.blank_id))
            emitted_logprob(ids, logprobs, speech.blank_id)
            speech_ratio(ids, speech.blank_id, speech.frame_s)
        return (time.perf_counter() - start) / segments * 1e6

    def tokenizers_own(ids):
        return speech.tokenizer.decode(ids, skip_special_tokens=True, group_tokens=False)

    return {
        "ours_us": min(run(speech.decode_ids) for _ in range(3)),
        "tokenizer_decode_us": min(run(tokenizers_own) for _ in range(3)),
    }


def timed(device: str, work) -> tuple[float, object]:
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = work()
    synchronize(device)
    return time.perf_counter() - start, out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny dimensions and a few short clips (CPU smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    parser.add_argument("--clips", type=int, help="recordings (default 1024; 8 with --tiny)")
    parser.add_argument("--min-s", type=float, help="shortest clip, seconds (default 2; 1 with --tiny)")
    parser.add_argument("--max-s", type=float, help="longest clip, seconds (default 30; 3 with --tiny)")
    parser.add_argument("--card-clips", type=int, help="clips for the one-at-a-time loop (default 128; 4 with --tiny)")
    parser.add_argument("--batch-sizes", help="comma-separated (default 32,64,128,256; 2,4 with --tiny)")
    parser.add_argument("--tokens-per-s", type=float, default=4.0, help="emitted tokens per audio second (default 4)")
    args = parser.parse_args(argv)

    started = time.perf_counter()
    tiny = args.tiny
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("float32" if tiny else "bfloat16")
    clip_count = args.clips or (8 if tiny else 1024)
    min_s, max_s = args.min_s or (1.0 if tiny else 2.0), args.max_s or (3.0 if tiny else 30.0)
    card_count = min(clip_count, args.card_clips or (4 if tiny else 128))
    batch_sizes = [int(b) for b in (args.batch_sizes or ("2,4" if tiny else "32,64,128,256")).split(",")]

    import transformers

    model, processor = build(tiny, device, getattr(torch, dtype_name))
    clips = make_clips(clip_count, min_s, max_s)
    share = set_blank_bias(model, processor, clips[:8], device, args.tokens_per_s)
    build_s = time.perf_counter() - started
    speech = CtcSpeechModel(model, processor, device, max_batch_audio_s=max(batch_sizes) * max_s + 1)
    audio_s = sum(len(c) for c in clips) / SAMPLE_RATE_HZ
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"TurboCTC throughput: {'tiny dims' if tiny else 'granite-speech-5.0-470m-turboctc architecture'}, random "
        f"weights, {parameters / 1e6:.1f} M parameters, {dtype_name}, {device} ({device_name}), torch "
        f"{torch.__version__}, transformers {transformers.__version__}; built in {build_s:.1f} s"
    )
    print(f"{len(clips)} clips of {min_s:g}-{max_s:g} s ({audio_s:.0f} s of audio); {share:.1%} of frames emit a token")

    with torch.inference_mode():  # first kernels, cuBLAS handles: not timed
        card(model, processor, clips[:2], device)
        card_batches(model, processor, clips[:2], device, 2)
        ours(speech, clips[:4], 2, words=True)

    plan = [("card", 1, clips[:card_count], lambda: card(model, processor, clips[:card_count], device))]
    for size in batch_sizes:
        plan.append(("card-batch", size, clips, lambda size=size: card_batches(model, processor, clips, device, size)))
        plan.append(("ours", size, clips, lambda size=size: ours(speech, clips, size)))
    results = []
    print(f"\n{'mode':<14} {'batch':>5} {'clips':>5} {'wall s':>8} {'RTFx':>9} {'peak GPU GiB':>13}")

    def record(name: str, size: int, subset, work) -> dict:
        wall, out = timed(device, work)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
        subset_s = sum(len(c) for c in subset) / SAMPLE_RATE_HZ
        row = {
            "mode": name,
            "batch_size": size,
            "clips": len(subset),
            "audio_s": subset_s,
            "wall_s": wall,
            "rtfx": subset_s / wall,
            "peak_gpu_gib": peak,
            "characters": sum(len(t) for t in out) if isinstance(out, list) else None,
        }
        results.append(row)
        shown = "-" if peak is None else f"{peak:.1f}"
        print(f"{name:<14} {size:>5} {len(subset):>5} {wall:>8.3f} {row['rtfx']:>9.1f} {shown:>13}", flush=True)
        return row

    for name, size, subset, work in plan:
        record(name, size, subset, work)
    best = max((r for r in results if r["mode"] == "ours"), key=lambda r: r["rtfx"])
    size = best["batch_size"]
    words = record("ours-words", size, clips, lambda: ours(speech, clips, size, words=True))
    feats = record("features", size, clips, lambda: features_only(speech, clips, size))
    encoder = record("features+enc", size, clips, lambda: encoder_only(speech, clips, size))
    split = {
        "batch_size": size,
        "features_share": feats["wall_s"] / best["wall_s"],
        "encoder_share": (encoder["wall_s"] - feats["wall_s"]) / best["wall_s"],
        "host_decode_share": (best["wall_s"] - encoder["wall_s"]) / best["wall_s"],
        "word_times_cost": words["wall_s"] / best["wall_s"] - 1.0,
    }
    host = host_decode_us(speech)
    print(
        f"host work per segment: {host['ours_us']:.0f} us with the job's decode, "
        f"{host['tokenizer_decode_us']:.0f} us with the tokenizer's own"
    )
    summary = {
        "bench": "turboctc-gpu",
        "tiny": tiny,
        "device": device,
        "device_name": device_name,
        "dtype": dtype_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "parameters": parameters,
        "clips": len(clips),
        "clip_s": [min_s, max_s],
        "audio_s": audio_s,
        "token_frame_share": share,
        "build_s": build_s,
        "total_s": time.perf_counter() - started,
        "results": results,
        "split_of_ours": split,
        "host_per_segment": host,
    }
    card_best = max(r["rtfx"] for r in results if r["mode"] == "card-batch")
    print(
        f"\nbest RTFx: card one at a time {results[0]['rtfx']:.0f}, card batches {card_best:.0f}, ours "
        f"{best['rtfx']:.0f} (batch {size}; with word times {words['rtfx']:.0f}); of ours: features "
        f"{split['features_share']:.0%}, encoder {split['encoder_share']:.0%}, host decode "
        f"{split['host_decode_share']:.0%} (IBM's blog: above 12,600 on one H200)"
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
