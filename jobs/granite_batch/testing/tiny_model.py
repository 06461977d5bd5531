"""Tiny, randomly initialised checkpoints of the real Granite Speech architectures.

One per model type the job serves (`MODEL_TYPES`): `granite_speech` (4.0-1b, 4.1-2b),
`granite_speech_plus` (4.1-2b-plus) and `granite_speech5_ctc` (5.0 TurboCTC). Tests, benchmarks and
people without the weights load them with `--model DIR` through the same `AutoProcessor` /
`AutoModelForSpeechSeq2Seq` / `AutoModelForCTC` path as the published models. Their output is
meaningless text, but it depends on the audio, so equality tests are informative.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

AUDIO_TOKEN = "<|audio|>"
EOS_TOKEN = "<|end_of_text|>"
PAD_TOKEN = "<|pad|>"

# Same rendering as granite-4.0-1b-speech's template for a single user turn:
# "USER: <|audio|>instruction\n ASSISTANT:" (IBM's speculative_decoding_notebook.ipynb prints it).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ 'USER: ' + message['content'] + '\\n' }}"
    "{%- elif message['role'] == 'assistant' -%}{{ ' ASSISTANT: ' + message['content'] + eos_token + '\\n' }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ ' ASSISTANT:' }}{%- endif -%}"
)
# granite-speech-4.1-2b-plus's template continues the assistant's turn with `prefix_text` (its incremental
# decoding, transformers' granite_speech_plus.md "Task 4"): `{%- if prefix_text is defined and
# prefix_text %}{{- prefix_text }}{%- endif %}` after the generation prompt.
PLUS_CHAT_TEMPLATE = CHAT_TEMPLATE + "{%- if prefix_text is defined and prefix_text -%}{{ prefix_text }}{%- endif -%}"

_TRAINING_TEXT = [
    "USER: can you transcribe the speech into a written format?\n ASSISTANT:",
    "translate the speech to English French German Spanish Portuguese Japanese Italian Mandarin",
    "Keywords: Granite, Ray, Parquet, archive, interview, broadcast",
    "The quick brown fox jumps over the lazy dog. Numbers: 1 2 3 4 5 6 7 8 9 10.",
    "Le renard brun saute par-dessus le chien paresseux. Bonjour à tous.",
    "Der schnelle braune Fuchs springt über den faulen Hund. Guten Tag.",
    "El rápido zorro marrón salta sobre el perro perezoso. Buenos días.",
    "A rápida raposa marrom pula sobre o cão preguiçoso. Bom dia.",
    "素早い茶色の狐がのろまな犬を飛び越える。こんにちは。",
    # 4.1-2b-plus tags, so the tiny plus model can emit them
    "[Speaker 1]: hello [Speaker 2]: hi there [T:45] [T:82] [T:130] _",
]
MODEL_TYPES = ("granite_speech", "granite_speech_plus", "granite_speech5_ctc")
# The blank of granite-speech-5.0-470m-turboctc: id 0, `<|blank|>`, the tokenizer's pad token
# (transformers `models/granite_speech5/convert_granite_speech5_to_hf.py`).
CTC_BLANK_TOKEN = "<|blank|>"


def build_tokenizer(vocab_size: int = 512):
    """A byte-level BPE tokenizer of the class, special tokens and id layout a Granite Speech 4.x
    checkpoint names: `GPT2Tokenizer` (Granite's language models' tokenizer_config.json class, over a
    GPT-2 byte-level BPE), bos = eos = `<|end_of_text|>` right after pad `<|pad|>` (100257 and 100256
    in the real vocabulary), and `<|audio|>` the last id (100352 of 100353: IBM's
    `granite/run_eval_speculative_bpe.py`, "100352 Granite BPE tokens + 1 CTC blank"), registered as
    the tokenizer's `audio_token`, which GraniteSpeechProcessor reads."""
    from transformers import GPT2Tokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 3,
        special_tokens=[],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TRAINING_TEXT, trainer=trainer)
    backend.add_special_tokens([PAD_TOKEN, EOS_TOKEN, AUDIO_TOKEN])
    tokenizer = GPT2Tokenizer(
        tokenizer_object=backend,
        unk_token=None,
        bos_token=EOS_TOKEN,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        padding_side="left",
        extra_special_tokens={"audio_token": AUDIO_TOKEN},
    )
    assert tokenizer.convert_tokens_to_ids(AUDIO_TOKEN) == len(tokenizer) - 1
    assert tokenizer.eos_token_id == tokenizer.pad_token_id + 1
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def build_config(tokenizer, initializer_range: float = 0.5, model_type: str = "granite_speech", head_dim: int = 16):
    """The real `GraniteSpeechConfig` with every dimension shrunk.

    `initializer_range=0.5` makes the random model's output depend on the audio (with the default
    0.02 it emits one token for every input and equality tests pass trivially); an embedding
    multiplier of 1 rather than the published 12 keeps the audio embeddings from being drowned by
    the prompt's. It stays an integer, as in the published config.json, whose integer multiplier
    once broke loading in transformers 5.x (issue #44877). `head_dim` sets the text model's attention
    heads (64 / head_dim of them): vLLM's CPU attention needs at least 32.
    """
    from transformers import (
        GraniteConfig,
        GraniteSpeechConfig,
        GraniteSpeechEncoderConfig,
        GraniteSpeechPlusConfig,
        GraniteSpeechPlusEncoderConfig,
    )
    from transformers.models.blip_2.configuration_blip_2 import Blip2QFormerConfig

    plus = model_type == "granite_speech_plus"

    vocab_size = len(tokenizer)
    text_config = GraniteConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=64 // head_dim,
        num_key_value_heads=max(1, 32 // head_dim),
        # The plus model's budgets reach 10,000 new tokens (word timestamps, its card), so its context
        # is Granite 4.0's long one; the base model keeps 4096 so prompt-context tests stay small.
        max_position_embeddings=131072 if plus else 4096,
        embedding_multiplier=1,
        logits_scaling=8.0,
        residual_multiplier=0.22,
        attention_multiplier=0.0078125,
        initializer_range=initializer_range,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    encoder_kwargs = dict(input_dim=160, num_layers=2, hidden_dim=32, num_heads=4, output_dim=16, context_size=200)
    # The plus encoder concatenates hidden layers for the projector (its `cat_hidden_layers`): one here.
    encoder_config = (
        GraniteSpeechPlusEncoderConfig(**encoder_kwargs, cat_hidden_layers=[0])
        if plus
        else GraniteSpeechEncoderConfig(**encoder_kwargs)
    )
    projector_config = Blip2QFormerConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=4,
        intermediate_size=64,
        encoder_hidden_size=64 if plus else 32,
        cross_attention_frequency=1,
        initializer_range=initializer_range,  # the projector too, or its output barely depends on the audio
    )
    return (GraniteSpeechPlusConfig if plus else GraniteSpeechConfig)(
        text_config=text_config,
        encoder_config=encoder_config,
        projector_config=projector_config,
        audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN),
        has_lora_adapter=False,
        downsample_rate=5,
        window_size=15,
        initializer_range=initializer_range,
        tie_word_embeddings=False,
    )


def write_tiny_model(
    directory: str | Path, seed: int = 0, model_type: str = "granite_speech", head_dim: int = 16
) -> Path:
    """Write a tiny random checkpoint of `model_type` (model, processor, tokenizer) to `directory`;
    `head_dim` 32 makes one vLLM runs (build_config)."""
    import torch
    from transformers import (
        GenerationConfig,
        GraniteSpeechFeatureExtractor,
        GraniteSpeechForConditionalGeneration,
        GraniteSpeechPlusForConditionalGeneration,
        GraniteSpeechProcessor,
    )

    if model_type not in MODEL_TYPES:
        raise ValueError(f"unknown model type {model_type!r} (choose from {', '.join(MODEL_TYPES)})")
    if model_type == "granite_speech5_ctc":
        return write_tiny_ctc_model(directory, seed)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    template = PLUS_CHAT_TEMPLATE if model_type == "granite_speech_plus" else CHAT_TEMPLATE
    tokenizer.chat_template = template
    config = build_config(tokenizer, model_type=model_type, head_dim=head_dim)
    torch.manual_seed(seed)
    model_class = (
        GraniteSpeechPlusForConditionalGeneration
        if model_type == "granite_speech_plus"
        else GraniteSpeechForConditionalGeneration
    )
    model = model_class(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        max_new_tokens=200,
        do_sample=False,
        num_beams=1,
    )
    model.save_pretrained(directory)
    processor = GraniteSpeechProcessor(
        audio_processor=GraniteSpeechFeatureExtractor(projector_window_size=15, projector_downsample_rate=5),
        tokenizer=tokenizer,
        chat_template=template,
    )
    processor.save_pretrained(directory)
    return directory


def build_ctc_tokenizer(vocab_size: int = 320):
    """The tokenizer class the real TurboCTC checkpoint loads with: `ParakeetTokenizer` (transformers'
    auto mapping for `granite_speech5_ctc`), over a GPT-2 style byte-level BPE (`Ġ` word starts, the
    decoder dropping the leading space) whose id 0 is the blank `<|blank|>` and the pad token, as
    `convert_granite_speech5_to_hf.py` builds it. Its decode groups repeated ids and drops the blank."""
    from transformers import ParakeetTokenizer

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    backend.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[CTC_BLANK_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(_TRAINING_TEXT[3:], trainer=trainer)
    tokenizer = ParakeetTokenizer(tokenizer_object=backend, pad_token=CTC_BLANK_TOKEN)
    assert tokenizer.pad_token_id == 0
    return tokenizer


def write_tiny_ctc_model(directory: str | Path, seed: int = 0) -> Path:
    """Write a tiny random Granite Speech 5 CTC checkpoint (GraniteSpeech5ForCTC, its processor and a
    BPE tokenizer) to `directory`.

    `initializer_range=0.5` makes frame labels depend on the audio; the blank's bias is raised so that
    about half the frames of speech are blank, as in a trained CTC model, and texts are not one token
    per frame.
    """
    import torch
    from transformers import (
        GraniteSpeech5CTCConfig,
        GraniteSpeech5EncoderConfig,
        GraniteSpeech5FeatureExtractor,
        GraniteSpeech5ForCTC,
        GraniteSpeech5Processor,
    )

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = build_ctc_tokenizer()
    vocab_size = len(tokenizer)
    encoder_config = GraniteSpeech5EncoderConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_mel_bins=80,
        context_size=64,
        max_position_embeddings=64,
        initializer_range=0.5,
    )
    config = GraniteSpeech5CTCConfig(
        vocab_size=vocab_size, encoder_config=encoder_config, pad_token_id=tokenizer.pad_token_id
    )
    torch.manual_seed(seed)
    model = GraniteSpeech5ForCTC(config).eval()
    with torch.no_grad():
        model.ctc_head.bias[tokenizer.pad_token_id] += CTC_BLANK_BIAS
    model.save_pretrained(directory)
    processor = GraniteSpeech5Processor(feature_extractor=GraniteSpeech5FeatureExtractor(), tokenizer=tokenizer)
    processor.save_pretrained(directory)
    return directory


# Added to the blank's logit of the tiny CTC model (see write_tiny_ctc_model).
CTC_BLANK_BIAS = 9.0


def write_tiny_bpe_head(directory: str | Path, seed: int = 0) -> Path:
    """Add a random BPE CTC head (`out_llm.safetensors`, as granite-speech-4.1-2b ships it: encoder hidden
    size -> vocabulary + 1, label 0 the blank) to the tiny granite_speech checkpoint in `directory`."""
    import json

    import torch
    from safetensors.torch import save_file

    directory = Path(directory)
    config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    hidden = config["encoder_config"]["hidden_dim"]
    vocab = config["text_config"]["vocab_size"]
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(vocab + 1, hidden, generator=generator) * 0.5
    bias = torch.zeros(vocab + 1)
    bias[0] = 2.0  # blanks are frequent, as in a trained CTC head
    save_file({"weight": weight.contiguous(), "bias": bias}, str(directory / "out_llm.safetensors"))
    return directory
