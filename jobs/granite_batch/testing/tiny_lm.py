"""A tiny, randomly initialised Granite language model for the second pass (see second_pass.py).

The real `GraniteConfig` / `GraniteForCausalLM`, loaded through `AutoModelForCausalLM` /
`AutoTokenizer` like `ibm-granite/granite-4.0-micro`. Its tokenizer is the tiny speech model's
(tiny_model.build_tokenizer) plus Granite 4.0's role tokens and chat template shape
(`<|start_of_role|>user<|end_of_role|>...<|end_of_text|>`). The context is short (256 positions)
so long transcripts take the chunked path in tests; its text is gibberish that depends on the input.
"""

from __future__ import annotations

from pathlib import Path

from granite_batch.testing.tiny_model import build_tokenizer

ROLE_TOKENS = ("<|start_of_role|>", "<|end_of_role|>")

# Granite 4.0's template for plain chat turns (no tools, no documents, no default system prompt).
LM_CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|start_of_role|>' + message['role'] + '<|end_of_role|>' + message['content'] + eos_token + '\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|start_of_role|>assistant<|end_of_role|>' }}{%- endif -%}"
)


def build_lm_tokenizer():
    """The tiny speech tokenizer with Granite 4.0's role tokens and chat template."""
    tokenizer = build_tokenizer()
    tokenizer.add_tokens(list(ROLE_TOKENS), special_tokens=True)
    tokenizer.chat_template = LM_CHAT_TEMPLATE
    return tokenizer


def write_tiny_lm(directory: str | Path, seed: int = 0, max_position_embeddings: int = 256) -> Path:
    """Write a tiny random Granite causal LM checkpoint (weights, config, tokenizer) to `directory`."""
    import torch
    from transformers import GenerationConfig, GraniteConfig, GraniteForCausalLM

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_lm_tokenizer()
    tokenizer.model_max_length = max_position_embeddings
    config = GraniteConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_position_embeddings,
        embedding_multiplier=1,
        logits_scaling=8.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0078125,
        # 0.5 rather than 0.02: with tiny random weights the output then depends on the input.
        initializer_range=0.5,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = GraniteForCausalLM(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=64,
        do_sample=False,
        num_beams=1,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
