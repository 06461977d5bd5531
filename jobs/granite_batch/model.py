"""Load Granite Speech and run batched, batch-invariant generation.

Batching follows what ../shared/FACTS.md measured: the feature extractor zero-pads waveforms before
the mel step and the conformer encoder has no padding mask, so padded audio changes the audio
embeddings. Features and encoder + projector therefore run per recording (or per group of
recordings with identical sample counts and prompts), and only the language model is batched, on
left-padded `inputs_embeds` with an attention mask. Greedy output is then the same as one at a time.
"""

from __future__ import annotations

import logging
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from granite_batch.prompts import Request, render_prompt

log = logging.getLogger(__name__)

# A segment shorter than this holds no word; it gets empty text instead of a model call.
MIN_SEGMENT_S = 0.1


class ModelLoadError(RuntimeError):
    """The model or its processor cannot be loaded; the message says what to do."""


@dataclass(frozen=True)
class ModelRef:
    """Which model a run uses, as recorded beside every row."""

    name: str
    revision: str | None


def _load_hint(name: str) -> str:
    if os.path.isdir(name):
        return "check that the folder holds config.json, the weights and the processor files"
    return (
        "if this machine cannot reach the Hugging Face Hub, download the model elsewhere "
        "(huggingface-cli download " + name + ") and pass --model /path/to/that/folder"
    )


def resolve_model(name: str, revision: str | None = None, trust_remote_code: bool = False) -> ModelRef:
    """Check that the model's config and processor can be loaded, and find its exact revision.

    Cheap enough for the driver (no weights), so a wrong --model stops the job before any work.
    """
    from transformers import AutoConfig, AutoProcessor
    from transformers.utils import cached_file

    try:
        AutoConfig.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
        AutoProcessor.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a bad model
        raise ModelLoadError(f"cannot load model {name!r}: {_first_line(exc)}; {_load_hint(name)}") from None
    if os.path.isdir(name):
        _check_local_weights(Path(name))
        return ModelRef(str(Path(name).resolve()), revision)
    config_path = cached_file(name, "config.json", revision=revision)
    parts = Path(config_path).parts
    # Hub cache layout: .../models--org--name/snapshots/<commit sha>/config.json
    resolved = parts[-2] if len(parts) > 2 and parts[-3] == "snapshots" else revision
    return ModelRef(name, resolved)


def _check_local_weights(folder: Path) -> None:
    """Read every safetensors header, so truncated or corrupt weights stop the job in the driver.

    safetensors checks that the header describes exactly the bytes in the file; this costs one
    small read per file, not a load of the weights.
    """
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files and not list(folder.glob("*.bin")):
        raise ModelLoadError(f"cannot load model {str(folder)!r}: no weights (*.safetensors) in the folder")
    for path in files:
        try:
            with safe_open(str(path), "pt") as handle:
                handle.keys()
        except Exception as exc:
            raise ModelLoadError(
                f"cannot load model {str(folder)!r}: corrupt weights in {path.name} ({_first_line(exc)}); "
                "download the model again"
            ) from None


def _first_line(exc: Exception) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:300]


class SpeechModel:
    """A Granite Speech model and its processor on one device, ready for batched generation."""

    def __init__(self, model, processor, device: str, max_new_tokens: int = 200, num_beams: int = 1,
                 repetition_penalty: float = 1.0, max_batch_audio_s: float = 480.0):
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.num_beams = num_beams
        self.repetition_penalty = repetition_penalty
        self.max_batch_audio_s = max_batch_audio_s
        self.sample_rate_hz = processor.audio_processor.sampling_rate
        self._prompts: dict[Request, str] = {}

    @classmethod
    def load(cls, name: str, revision: str | None = None, device: str = "auto", dtype: str = "auto",
             trust_remote_code: bool = False, **options) -> "SpeechModel":
        """Load processor and weights once (hub id or local folder) onto `device`."""
        import torch
        from transformers import AutoModelForSpeechSeq2Seq, AutoProcessor

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        try:
            processor = AutoProcessor.from_pretrained(name, revision=revision, trust_remote_code=trust_remote_code)
            model = AutoModelForSpeechSeq2Seq.from_pretrained(
                name, revision=revision, dtype=getattr(torch, dtype), attn_implementation="sdpa",
                trust_remote_code=trust_remote_code,
            )
        except Exception as exc:
            raise ModelLoadError(f"cannot load model {name!r}: {_first_line(exc)}; {_load_hint(name)}") from None
        model = model.to(device).eval()
        return cls(model, processor, device, **options)

    def prompt(self, request: Request) -> str:
        if request not in self._prompts:
            self._prompts[request] = render_prompt(self.tokenizer, request)
        return self._prompts[request]

    def generate(self, items: list[tuple[np.ndarray, Request]]) -> list[str]:
        """Transcribe or translate each (16 kHz mono samples, request); results in input order."""
        results = [""] * len(items)
        min_samples = int(MIN_SEGMENT_S * self.sample_rate_hz)
        order = sorted((i for i in range(len(items)) if len(items[i][0]) >= min_samples),
                       key=lambda i: len(items[i][0]), reverse=True)
        budget = self.max_batch_audio_s * self.sample_rate_hz
        batch: list[int] = []
        for index in order:
            # Sorted longest first, so the first item of a batch sets its padded length.
            if batch and len(items[batch[0]][0]) * (len(batch) + 1) > budget:
                self._generate_batch(items, batch, results)
                batch = []
            batch.append(index)
        if batch:
            self._generate_batch(items, batch, results)
        return results

    def _generate_batch(self, items, batch: list[int], results: list[str]) -> None:
        import torch

        with torch.inference_mode():
            embeds = self._prompt_embeddings(items, batch)
            width = max(e.shape[0] for e in embeds)
            hidden = embeds[0].shape[1]
            inputs = torch.zeros((len(batch), width, hidden), dtype=embeds[0].dtype, device=self.device)
            mask = torch.zeros((len(batch), width), dtype=torch.long, device=self.device)
            for row, e in enumerate(embeds):
                inputs[row, width - e.shape[0]:] = e  # left padding
                mask[row, width - e.shape[0]:] = 1
            tokens = self.model.generate(
                inputs_embeds=inputs, attention_mask=mask, max_new_tokens=self.max_new_tokens,
                num_beams=self.num_beams, do_sample=False, repetition_penalty=self.repetition_penalty,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        texts = self.tokenizer.batch_decode(tokens, skip_special_tokens=True)
        for index, text in zip(batch, texts):
            results[index] = text.strip()

    def _prompt_embeddings(self, items, batch: list[int]) -> list:
        """Per item: prompt token embeddings with its audio embeddings in place of `<|audio|>` tokens."""
        import torch

        groups: dict[tuple[int, Request], list[int]] = defaultdict(list)
        for index in batch:
            samples, request = items[index]
            groups[(len(samples), request)].append(index)
        embeds: dict[int, object] = {}
        inner = self.model.model
        for (_, request), members in groups.items():
            # Equal sample counts and prompts need no padding, so they can share one encoder pass.
            prompt = self.prompt(request)
            waveforms = [torch.tensor(items[i][0]) for i in members]  # a copy: Arrow buffers are read-only
            features = self.processor(text=[prompt] * len(members), audio=waveforms, return_tensors="pt").to(
                self.device
            )
            audio = self.model.get_audio_features(
                features["input_features"].to(self.model.dtype), return_dict=True
            ).pooler_output
            merged = inner.get_merged_audio_embeddings(
                input_ids=features["input_ids"], audio_features=audio,
                input_features_mask=features["input_features_mask"],
            )
            for row, index in enumerate(members):
                embeds[index] = merged[row]
        return [embeds[index] for index in batch]


# Scripts written without spaces between words.
_UNSPACED_LANGUAGES = {"ja", "zh"}


def transcribe_table(table, speech_model: SpeechModel):
    """Inference stage: every segment of every decoded row in one batched call; adds `text`, `segments`.

    Drops the samples and segment offsets: what leaves this stage is small enough to write.
    """
    import pyarrow as pa

    from granite_batch.audio import samples_from_arrow
    from granite_batch.output import SEGMENT_TYPE

    recordings = samples_from_arrow(table.column("samples"))
    starts = table.column("segment_starts").to_pylist()
    ends = table.column("segment_ends").to_pylist()
    errors = table.column("error").to_pylist()
    tasks = table.column("task").to_pylist()
    targets = table.column("target_language").to_pylist()
    languages = table.column("language").to_pylist()
    keywords = table.column("keywords").to_pylist()

    items: list[tuple[np.ndarray, Request]] = []
    owners: list[tuple[int, int]] = []  # (row, segment index) for each item
    for row, samples in enumerate(recordings):
        if samples is None or errors[row] is not None:
            continue
        request = Request(tasks[row], targets[row], tuple(keywords[row] or ()))
        for k, (start, end) in enumerate(zip(starts[row], ends[row])):
            items.append((samples[start:end], request))
            owners.append((row, k))

    texts = _generate_or_isolate(speech_model, items, owners, errors)
    rate = speech_model.sample_rate_hz
    segments: list[list[dict] | None] = [[] for _ in recordings]
    for (row, k), text in zip(owners, texts):
        if text is not None:
            segments[row].append({"start": starts[row][k] / rate, "end": ends[row][k] / rate, "text": text})
    joined: list[str | None] = []
    for row in range(len(recordings)):
        if errors[row] is not None:
            joined.append(None)
            segments[row] = []
            continue
        language = targets[row] if tasks[row] == "ast" else languages[row]
        separator = "" if language in _UNSPACED_LANGUAGES else " "
        joined.append(separator.join(s["text"] for s in segments[row] if s["text"]))

    table = table.drop_columns(["samples", "segment_starts", "segment_ends"])
    table = table.set_column(table.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
    table = table.append_column("text", pa.array(joined, pa.string()))
    return table.append_column("segments", pa.array(segments, pa.list_(SEGMENT_TYPE)))


def _generate_or_isolate(speech_model: SpeechModel, items, owners, errors: list) -> list[str | None]:
    """Generate for all items; if the batch fails, retry row by row so one bad row fails alone."""
    try:
        return speech_model.generate(items)
    except Exception as exc:  # a failed batch must not take its neighbours down
        log.warning("batch of %d segments failed (%s); retrying row by row", len(items), _first_line(exc))
    texts: list[str | None] = [None] * len(items)
    by_row: dict[int, list[int]] = defaultdict(list)
    for position, (row, _) in enumerate(owners):
        by_row[row].append(position)
    for row, positions in by_row.items():
        try:
            for position, text in zip(positions, speech_model.generate([items[p] for p in positions])):
                texts[position] = text
        except Exception as exc:
            errors[row] = f"inference failed: {type(exc).__name__}: {_first_line(exc)}"[:300]
            for position in positions:
                texts[position] = None
    return texts
