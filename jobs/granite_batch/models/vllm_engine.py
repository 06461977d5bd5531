"""vLLM as the engine of the LLM-based Granite Speech models (`granite_speech`, `granite_speech_plus`).

`VllmSpeechModel` answers what model.SpeechModel answers (`generate_segments(items) -> [SegmentResult]`,
`prompt`, `token_budget`, `profile`, `processor`, `tokenizer`), so the inference stage, routing,
assembly, subtitles and the summary's figures do not know which engine ran. Prompts are the same text
(the processor's chat template through the profile), decoding is greedy with the same per-segment token
budget, and the text is decoded from the token ids by the same tokenizer. vLLM schedules the segments
of a call itself (continuous batching), so no row waits for a longer neighbour and no prompt is padded.

vLLM is imported only here and in vllm_plugin.py, and only when this engine is chosen: the job's own
environment need not have it. Batch invariance needs the plugin (vllm_plugin.py), which vLLM loads in
every engine process from the package's `vllm.general_plugins` entry point.
"""

from __future__ import annotations

import os
from types import SimpleNamespace

import numpy as np

from granite_batch.models.confidence import mean_logprob
from granite_batch.models.hub import ModelLoadError, first_line, hub_options, load_hint, offline_error
from granite_batch.models.model import MIN_SEGMENT_S, SegmentResult, SpeechModel
from granite_batch.models.profiles import ModelProfile
from granite_batch.models.prompts import Request
from granite_batch.models.speculative import BY_AUTOREGRESSIVE

# Context vLLM reserves per sequence where the checkpoint allows more: a 30 s segment is ~300 audio
# tokens and its budget 376; the plus model's word-time budget (10,000, its card) is the largest.
MAX_MODEL_LEN = 16384
# KV cache (GiB) vLLM's CPU backend takes when the environment does not say (VLLM_CPU_KVCACHE_SPACE);
# its own default (4 GiB per engine) is too much beside Ray's workers on a small machine.
CPU_KVCACHE_GIB = "1"


class VllmSpeechModel(SpeechModel):
    """A Granite Speech model served by a `vllm.LLM`, answering like model.SpeechModel: it inherits
    the prompts (`prompt`) and token budgets (`token_budget`), and sets the attributes they read; the
    transformers model's own machinery (drafts, beams, encoder passes) is not used."""

    def __init__(
        self,
        llm,
        processor,
        config,
        device: str,
        max_new_tokens: int | None = 200,
        max_new_tokens_per_audio_s: float | None = None,
        profile: ModelProfile | None = None,
        **ignored,
    ):
        # SpeechModel's __init__ loads nothing but sets up transformers' decoding; this sets what is shared.
        if max_new_tokens is None and max_new_tokens_per_audio_s is None:
            raise ValueError("give max_new_tokens, max_new_tokens_per_audio_s or both")
        self.llm = llm
        self.processor = processor
        self.tokenizer = processor.tokenizer
        # What transcribe.fit_context reads of a model: its config (the language model's context).
        self.model = SimpleNamespace(config=config)
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.max_new_tokens_per_audio_s = max_new_tokens_per_audio_s
        self.profile = profile
        self.sample_rate_hz = processor.audio_processor.sampling_rate
        self.bpe_head = None
        self._prompts: dict[Request, str] = {}

    @classmethod
    def load(
        cls,
        name: str,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        engine_args: dict | None = None,
        **options,
    ) -> VllmSpeechModel:
        """Start a vLLM engine for `name` (hub id or folder) and load its processor; `engine_args` are
        passed to `vllm.LLM` over the defaults (benchmarks and tests use them)."""
        import torch
        import transformers

        try:
            import vllm
        except ImportError as exc:
            raise ModelLoadError(
                f"engine vllm needs vLLM installed beside the job ({first_line(exc)}); see the how-to "
                "'Run with vLLM' (.ci/vllm-env builds such an environment), or use engine transformers"
            ) from None
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        if device == "cpu":
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", CPU_KVCACHE_GIB)
        hub = hub_options(name)
        try:
            processor = transformers.AutoProcessor.from_pretrained(
                name, revision=revision, trust_remote_code=trust_remote_code, **hub
            )
            config = transformers.AutoConfig.from_pretrained(
                name, revision=revision, trust_remote_code=trust_remote_code, **hub
            )
        except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for a bad model
            if hub:
                raise offline_error(name) from None
            raise ModelLoadError(f"cannot load model {name!r}: {first_line(exc)}; {load_hint(name)}") from None
        text_config = getattr(config, "text_config", config)
        max_model_len = min(getattr(text_config, "max_position_embeddings", MAX_MODEL_LEN), MAX_MODEL_LEN)
        arguments = {
            "model": name,
            "tokenizer": name,
            "revision": None if os.path.isdir(name) else revision,
            "dtype": dtype,
            "trust_remote_code": trust_remote_code,
            "seed": 0,
            # vLLM's Granite Speech takes one audio per prompt.
            "limit_mm_per_prompt": {"audio": 1},
            "max_model_len": max_model_len,
            "max_num_batched_tokens": max_model_len,
            "max_num_seqs": options.get("max_batch_segments") or 256,
            **(engine_args or {}),
        }
        if device == "cpu":
            arguments.setdefault("enforce_eager", True)
        try:
            llm = vllm.LLM(**arguments)
        except Exception as exc:
            raise ModelLoadError(f"vLLM cannot load model {name!r}: {first_line(exc)}") from exc
        return cls(llm, processor, config, device, profile=options.pop("profile", None), **options)

    def generate_segments(
        self, items: list[tuple[np.ndarray, Request]], posteriors: bool = False, audio_ids: list[str] | None = None
    ) -> list[SegmentResult]:
        """Greedy text for each (samples, request), in input order, with the facts model.SpeechModel
        gives: new tokens, whether the budget stopped it, positions computed (no padding: vLLM packs
        sequences), the mean scaled log-probability of its tokens. All items go to vLLM at once; its
        scheduler batches them (results do not depend on it, with vllm_plugin; tested).

        `audio_ids` name the items' audio for vLLM's caches (its `multi_modal_uuids`): by default vLLM
        hashes the samples, and an audio seen before reuses its cached encoder output; distinct ids
        make it encode again (tests compare batchings that way)."""
        from vllm import SamplingParams

        if posteriors:
            # Refused at config time (engines.engine_problem); this guards direct callers.
            raise ValueError("engine vllm has no CTC posteriors for word alignment: use engine transformers")
        results = [SegmentResult("", None)] * len(items)
        min_samples = int(MIN_SEGMENT_S * self.sample_rate_hz)
        chosen = [i for i, (samples, _) in enumerate(items) if len(samples) >= min_samples]
        if not chosen:
            return results
        prompts, parameters = [], []
        for i in chosen:
            samples, request = items[i]
            prompt = {
                "prompt": self.prompt(request),
                "multi_modal_data": {"audio": (np.asarray(samples, dtype=np.float32), self.sample_rate_hz)},
            }
            if audio_ids is not None:
                prompt["multi_modal_uuids"] = {"audio": [audio_ids[i]]}
            prompts.append(prompt)
            # Greedy as IBM's cards (do_sample=False, num_beams=1); logprobs=0: the chosen token's own.
            parameters.append(
                SamplingParams(temperature=0.0, max_tokens=self.token_budget(samples, request), logprobs=0)
            )
        outputs = self.llm.generate(prompts, parameters, use_tqdm=False)
        eos = self.tokenizer.eos_token_id
        for position, (i, output) in enumerate(zip(chosen, outputs)):
            completion = output.outputs[0]
            generated = list(completion.token_ids)
            if generated and generated[-1] == eos:
                generated = generated[:-1]
            # As the transformers engine counts them (model.py `_autoregressive`): pad ids are not text, and
            # the log-probabilities are those of the first len(tokens) steps.
            tokens = [token for token in generated if token != self.tokenizer.pad_token_id]
            truncated = completion.finish_reason == "length"
            logprobs = [step[token].logprob for step, token in zip(completion.logprobs or [], generated)]
            logprobs = logprobs[: len(tokens)]
            positions = len(output.prompt_token_ids or []) + len(tokens) + (0 if truncated else 1)
            raw_text = self.tokenizer.decode(tokens, skip_special_tokens=True)
            results[i] = SegmentResult(
                raw_text.strip(),
                BY_AUTOREGRESSIVE,
                len(tokens),
                truncated,
                positions,
                0,
                position == 0,
                mean_logprob(logprobs),
                raw_text=raw_text,
            )
        return results
