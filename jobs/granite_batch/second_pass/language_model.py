"""A causal language model for the second pass: loaded once, batched greedy generation with left padding."""

from __future__ import annotations

from granite_batch.config import SecondPassOptions
from granite_batch.models.hub import ModelLoadError, ModelRef, first_line, load_hint, resolve_model


class LanguageModel:
    """A causal language model and its tokenizer on one device: batched greedy generation, left padding."""

    def __init__(
        self,
        model,
        tokenizer,
        device: str,
        max_new_tokens: int = 256,
        batch_size: int = 8,
        max_batch_tokens: int = 32768,
        context_tokens: int | None = None,
    ):
        self.model = model
        self.tokenizer = tokenizer
        self.tokenizer.padding_side = "left"  # generation continues every row from its last real token
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.device = device
        self.max_new_tokens = max_new_tokens
        self.batch_size = batch_size
        self.max_batch_tokens = max_batch_tokens
        self.context_tokens = model_context(model.config, tokenizer, context_tokens)
        # Prompt tokens + new tokens never exceed the context: prompts longer than this are chunked.
        self.prompt_budget = self.context_tokens - max_new_tokens

    @classmethod
    def load(
        cls, name: str, revision: str | None = None, device: str = "auto", dtype: str = "auto", **options
    ) -> LanguageModel:
        """Load tokenizer and weights once (hub id or local folder) onto `device`: bf16 on GPU, fp32 on CPU."""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "bfloat16" if device == "cuda" else "float32"
        try:
            tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
            model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=getattr(torch, dtype))
        except Exception as exc:
            raise ModelLoadError(f"cannot load model {name!r}: {first_line(exc)}; {load_hint(name)}") from None
        return cls(model.to(device).eval(), tokenizer, device, **options)

    def count(self, prompt: str) -> int:
        return len(self.tokenizer(prompt, add_special_tokens=False, verbose=False)["input_ids"])

    def generate(self, prompts: list[str]) -> list[str]:
        """Greedy continuation of each prompt (already through the chat template); results in input order."""
        import torch

        lengths = [self.count(p) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: lengths[i], reverse=True)
        results = [""] * len(prompts)
        batch: list[int] = []
        for index in order + [None]:
            # Sorted longest first, so a batch's first prompt sets its padded width.
            full = batch and (
                index is None
                or len(batch) >= self.batch_size
                or lengths[batch[0]] * (len(batch) + 1) > self.max_batch_tokens
            )
            if full:
                encoded = self.tokenizer(
                    [prompts[i] for i in batch], add_special_tokens=False, padding=True, return_tensors="pt"
                ).to(self.device)
                with torch.inference_mode():
                    tokens = self.model.generate(
                        **encoded,
                        max_new_tokens=self.max_new_tokens,
                        do_sample=False,
                        num_beams=1,
                        pad_token_id=self.tokenizer.pad_token_id,
                    )
                texts = self.tokenizer.batch_decode(
                    tokens[:, encoded["input_ids"].shape[1] :], skip_special_tokens=True
                )
                for i, text in zip(batch, texts):
                    results[i] = text.strip()
                batch = []
            if index is not None:
                batch.append(index)
        return results


def model_context(config, tokenizer, cap: int | None = None) -> int:
    """Tokens the model attends over: its max_position_embeddings (or the tokenizer's limit), at most `cap`."""
    limits = [getattr(config, "max_position_embeddings", None), cap]
    if 0 < (tokenizer.model_max_length or 0) < 10**7:  # tokenizers without a limit say ~1e30
        limits.append(tokenizer.model_max_length)
    limits = [limit for limit in limits if limit]
    if not limits:
        raise ModelLoadError("the model states no context length; set second_pass.context_tokens")
    return min(limits)


def resolve_language_model(options: SecondPassOptions) -> tuple[ModelRef, object, int]:
    """(model ref, tokenizer, context tokens), checked in the driver without loading weights."""
    from transformers import AutoConfig, AutoTokenizer

    model_ref = resolve_model(options.model, options.revision)
    try:
        config = AutoConfig.from_pretrained(options.model, revision=options.revision)
        tokenizer = AutoTokenizer.from_pretrained(options.model, revision=options.revision)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {options.model!r}: {first_line(exc)}") from None
    if not getattr(tokenizer, "chat_template", None):
        raise ModelLoadError(f"cannot use model {options.model!r}: its tokenizer has no chat template")
    return model_ref, tokenizer, model_context(config, tokenizer, options.context_tokens)
