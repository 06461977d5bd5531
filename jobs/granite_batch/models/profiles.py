"""What each Granite Speech checkpoint can do, how it is prompted, and how it is run.

One profile per checkpoint family (STYLE.md 12), found from the checkpoint's own config.json
(`model_type`), so a local folder is treated exactly like its hub id. Stages ask the profile
("does this model serve this request?", "what is its instruction?", "how long may one call be?")
instead of branching on model types.

`granite_speech` covers granite-speech-3.3, granite-4.0-1b-speech and granite-speech-4.1-2b, which
share one architecture; 4.1's extra prompts (punctuation, Ja->En) cannot be read from its config, so
the 4.1 profile is chosen by name (a hub id or folder name containing "4.1"), or by `profile:` in the
job config for a renamed folder. An unknown `granite_speech*` type gets the most conservative
profile (English ASR, no keywords) and a warning.

Sources, cited beside each prompt below:
- granite-4.0-1b-speech card and IBM's granite-speech-models notebooks (ASR prompt, keywords);
- granite-speech-4.1-2b card (https://huggingface.co/ibm-granite/granite-speech-4.1-2b): "Punctuation
  and truecasing for ASR and AST in all languages ... with a simple prompt change", translation both
  ways between English and fr/de/es/pt/ja;
- granite-speech-4.1-2b-plus card and transformers' `docs/source/en/model_doc/granite_speech_plus.md`
  (the SYSTEM_PROMPT / ASR_PROMPT / SAA_PROMPT / TS_PROMPT of its usage section): no punctuation,
  no Japanese, no translation; keywords on its ASR prompt; `[Speaker N]:` turns; `[T:N]` word end times in
  centiseconds, modulo 1000;
- granite-speech-5.0-470m-turboctc card (https://huggingface.co/ibm-granite/granite-speech-5.0-470m-turboctc):
  English ASR, CTC over 16,384 BPE units, "inference is done non-autoregressively with greedy decoding".
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

from granite_batch.models.hub import hub_options
from granite_batch.models.prompts import (
    AST_INSTRUCTION,
    AST_PAIRS,
    AUDIO_TOKEN,
    LANGUAGE_NAMES,
    Request,
    clean_keywords,
)
from granite_batch.models.speculative import LEADERBOARD_40, LEADERBOARD_41

log = logging.getLogger(__name__)

# The segment length of a model whose profile names none: about what IBM's cards and the Open ASR
# leaderboard run 4.0 and 4.1 at, and the length their token budgets (16 + 12 per second) were sized for.
DEFAULT_SEGMENT_S = 30.0

GENERATE = "generate"  # a speech-aware language model: prompt, audio embeddings, autoregressive decoding
CTC = "ctc"  # an encoder with a CTC head: greedy frame decoding, no prompt

# IBM's notebooks and the 4.0-1b card: the raw (unpunctuated) transcription instruction.
ASR_INSTRUCTION = "can you transcribe the speech into a written format?"
# granite-speech-4.1-2b card ("a simple prompt change"); the same text is what IBM's ollama/GGUF
# builds of 4.1 document as their task prompt.
PUNCTUATED_ASR_INSTRUCTION = "transcribe the speech with proper punctuation and capitalization."
# granite-speech-4.1-2b card, "preferred prompt by task" (https://huggingface.co/ibm-granite/granite-speech-4.1-2b):
#   ASR (with keyword biasing)  transcribe the speech to text. Keywords: <kw1>, <kw2>, ...
#   AST (raw transcripts)       translate the speech to <language>.
#   AST (with punctuation)      translate the speech to <language> with proper punctuation and capitalization.
#   AST (with keyword biasing)  translate the speech to <language>. Keywords: <kw1>, <kw2>, ...
# IBM's granite-speech library (granite_speech/prompts.py) does the same: keywords replace the
# punctuation prompt by "transcribe the speech to text."
KEYWORD_ASR_INSTRUCTION_41 = "transcribe the speech to text."
AST_INSTRUCTION_41 = "translate the speech to {language}."
PUNCTUATED_AST_INSTRUCTION_41 = "translate the speech to {language} with proper punctuation and capitalization."
# granite_speech_plus.md (transformers docs of 4.1-2b-plus), usage section: SYSTEM_PROMPT, and the
# SAA_PROMPT / TS_PROMPT user turns, whose instruction follows "<|audio|> " (with a space).
PLUS_SYSTEM_PROMPT = (
    "Knowledge Cutoff Date: April 2024.\nToday's Date: December 19, 2024.\n"
    "You are Granite, developed by IBM. You are a helpful AI assistant"
)
SPEAKERS_INSTRUCTION = (
    "Speaker attribution: Transcribe and denote who is speaking by adding [Speaker 1]: and "
    "[Speaker 2]: tags before speaker turns."
)
WORD_TIMES_INSTRUCTION = (
    "Timestamps: Transcribe the speech. After each word, add a timestamp tag showing the "
    "end time in centiseconds, e.g. hello [T:45] world [T:82]"
)

_LATIN = ("en", "fr", "de", "es", "pt")
# granite-speech-4.1-2b card: "bidirectional automatic speech translation (AST) for English, French,
# German, Spanish, Portuguese and Japanese"; en->it/zh as for 4.0 (its model card, huggingface.co/ibm-granite).
AST_PAIRS_41 = frozenset({(src, "en") for src in ("fr", "de", "es", "pt", "ja")}) | frozenset(
    {("en", tgt) for tgt in ("fr", "de", "es", "pt", "ja", "it", "zh")}
)


@dataclass(frozen=True)
class ModelProfile:
    """A checkpoint family's capabilities, prompts, engine and per-call limits."""

    name: str
    engine: str  # GENERATE or CTC
    asr_languages: frozenset[str]
    ast_pairs: frozenset[tuple[str, str]] = frozenset()
    keywords: bool = False
    punctuation: bool = False  # a punctuated-transcript prompt beside the raw one
    speakers: bool = False  # `[Speaker N]:` turns by prompt
    word_times: bool = False  # `[T:N]` word end times by prompt (model-native, not alignment)
    preferred_prompts: bool = False  # 4.1's "preferred prompt by task" (keywords, translation)
    ctc_drafting: bool = False  # the encoder's character CTC head drafts for speculative decoding
    bpe_drafting: bool = False  # a separate BPE CTC head (out_llm.safetensors) drafts instead (bpe_draft.py)
    # Speculative decoding's (CTC entropy, verification probability, fallback beams) where the job
    # sets none: IBM's published values for this model (speculative.py).
    speculative_defaults: tuple[float, float, int] = LEADERBOARD_40
    system_prompt: str | None = None
    instruction_separator: str = ""  # between `<|audio|>` and the instruction
    # The segment length this model is run at when the job sets no `max_segment_s` (None: the job's
    # DEFAULT_SEGMENT_S); the per-call limits below cap it and any length the job sets.
    segment_s: float | None = None
    max_call_s: float | None = None  # longest audio one call may carry (None: no limit known)
    # Speech detection before the model (audio/vad.py); False: cut by energy alone (config `segmentation`).
    vad: bool = True
    max_speakers_call_s: float | None = None
    max_word_times_call_s: float | None = None
    # New tokens one call may generate, per prompt mode, where the card names them (None: the job's
    # per-second budget, model.SpeechModel.token_budget). A ceiling, as the card's `max_new_tokens`.
    asr_new_tokens: int | None = None  # ASR and speaker attribution
    word_times_new_tokens: int | None = None  # `[T:N]` word timestamps
    notes: tuple[str, ...] = field(default=(), compare=False)

    @property
    def tasks(self) -> tuple[str, ...]:
        return ("asr", "ast") if self.ast_pairs else ("asr",)

    def unsupported(self, request: Request) -> str | None:
        """What this model lacks to serve `request` (a short phrase), or None when it serves it."""
        language = request.language
        if request.task == "ast":
            if not self.ast_pairs:
                return "translation (ast)"
            if (language, request.target_language) not in self.ast_pairs:
                return f"translation {language} -> {request.target_language}"
        elif language in (None, "auto"):
            # The transcript is identified afterwards (language_id.py): a one-language model would
            # transcribe every recording as its language, so unknown-language rows need several.
            if len(self.asr_languages) < 2:
                return (
                    "transcription of recordings of unknown language (it transcribes only "
                    + " ".join(sorted(self.asr_languages))
                    + ")"
                )
        elif language not in self.asr_languages:
            return f"{language} transcription"
        if request.keywords and not self.keywords:
            return "keywords"
        if request.keywords and (request.speakers or (request.word_times and self.word_times)):
            # Plus: the card biases its ASR prompt only, not its speaker or `[T:N]` prompts; word times
            # by alignment (4.0, 4.1) leave the keyword prompt as it is.
            return "keywords with speaker labels or word times"
        if request.speakers and not self.speakers:
            return "speaker labels"
        if request.word_times and request.speakers:
            return "speaker labels and word times in one call"  # the card's prompts choose one
        if request.punctuation and not self.punctuation:
            return "punctuation"
        return None

    def serves(self, request: Request) -> bool:
        return self.unsupported(request) is None

    def max_segment_s(self, request: Request) -> float | None:
        """The longest segment one call may carry for `request` (None: no model limit)."""
        limits = [self.max_call_s]
        if request.speakers:
            limits.append(self.max_speakers_call_s)
        if request.word_times and self.word_times:
            limits.append(self.max_word_times_call_s)
        known = [limit for limit in limits if limit is not None]
        return min(known) if known else None

    def call_segment_s(self, job_max_segment_s: float | None) -> float:
        """The longest segment this model's calls carry in a job: the job's `max_segment_s` where set,
        else this model's own `segment_s` (else DEFAULT_SEGMENT_S), within every per-call limit of
        the model (segments are cut before a row's prompt mode is known)."""
        wanted = job_max_segment_s or self.segment_s or DEFAULT_SEGMENT_S
        limits = (self.max_call_s, self.max_speakers_call_s, self.max_word_times_call_s)
        return min([wanted, *(limit for limit in limits if limit is not None)])

    def new_tokens(self, request: Request) -> int | None:
        """The card's new-token budget for one call of `request`, or None where the card names none."""
        if request.word_times and self.word_times and not request.speakers:
            return self.word_times_new_tokens
        return self.asr_new_tokens

    def instruction(self, request: Request) -> str:
        """The user turn for `request`: the audio placeholder, then the instruction text."""
        keywords = clean_keywords(list(request.keywords)) if self.keywords else []
        if self.preferred_prompts:
            return AUDIO_TOKEN + self.instruction_separator + self._preferred_instruction(request, keywords)
        if request.task == "ast":
            text = AST_INSTRUCTION.format(language=LANGUAGE_NAMES[request.target_language])
        elif request.speakers and self.speakers:
            text = SPEAKERS_INSTRUCTION
        elif request.word_times and self.word_times:
            text = WORD_TIMES_INSTRUCTION
        elif request.punctuation and self.punctuation:
            text = PUNCTUATED_ASR_INSTRUCTION
        else:
            text = ASR_INSTRUCTION
        if keywords:
            separator = " " if text[-1] in ".?!" else ". "
            text = f"{text}{separator}Keywords: {', '.join(keywords)}"
        return AUDIO_TOKEN + self.instruction_separator + text

    @staticmethod
    def _preferred_instruction(request: Request, keywords: list[str]) -> str:
        """granite-speech-4.1-2b's "preferred prompt by task" (see the constants above)."""
        suffix = f" Keywords: {', '.join(keywords)}" if keywords else ""
        if request.task == "ast":
            language = LANGUAGE_NAMES[request.target_language]
            if request.punctuation and not keywords:
                return PUNCTUATED_AST_INSTRUCTION_41.format(language=language)
            return AST_INSTRUCTION_41.format(language=language) + suffix
        if keywords:
            return KEYWORD_ASR_INSTRUCTION_41 + suffix
        return PUNCTUATED_ASR_INSTRUCTION if request.punctuation else ASR_INSTRUCTION

    def render_prompt(self, tokenizer, request: Request) -> str:
        """The full prompt through the model's own chat template (system turn where the card uses one)."""
        messages = [{"role": "user", "content": self.instruction(request)}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": self.system_prompt})
        if not request.prefix_text:
            return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        # The incremental decoding of transformers' granite_speech_plus.md ("Task 4"):
        # `apply_chat_template(chat, add_generation_prompt=True, prefix_text=previous_transcript)`; the
        # plus checkpoint's template writes it after `<|start_of_role|>assistant<|end_of_role|>`. A
        # template without that clause ignores the argument, which would silently restart the speaker
        # numbering: refused instead.
        prompt = tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True, prefix_text=request.prefix_text
        )
        if not prompt.endswith(request.prefix_text):
            raise ValueError("this checkpoint's chat template does not write `prefix_text` (incremental decoding)")
        return prompt


GRANITE_SPEECH = ModelProfile(
    name="granite-speech",  # granite-4.0-1b-speech (and 3.3): the job's original model
    engine=GENERATE,
    asr_languages=frozenset(_LATIN + ("ja",)),
    ast_pairs=AST_PAIRS,
    keywords=True,
    ctc_drafting=True,
    notes=("4.0-1b's card lists no Ja->En training data; rows asking for it are served with a warning",),
)
GRANITE_SPEECH_41 = ModelProfile(
    name="granite-speech-4.1",
    engine=GENERATE,
    asr_languages=frozenset(_LATIN + ("ja",)),
    ast_pairs=AST_PAIRS_41,
    keywords=True,
    punctuation=True,
    preferred_prompts=True,
    # IBM's 4.1 leaderboard script (run_eval_speculative_bpe.py) drafts with the BPE CTC head of the
    # checkpoint's out_llm.safetensors (bpe_draft.py), not with the character head.
    ctc_drafting=False,
    bpe_drafting=True,
    speculative_defaults=LEADERBOARD_41,
)
GRANITE_SPEECH_PLUS = ModelProfile(
    name="granite-speech-plus",
    engine=GENERATE,
    asr_languages=frozenset(_LATIN),  # card: no Japanese
    # The card documents keyword biasing for plus as for 4.1-2b, on its ASR prompt ("can you transcribe
    # the speech into a written format? Keywords: ..."); not combined with speaker or timestamp prompts.
    keywords=True,
    speakers=True,
    word_times=True,
    system_prompt=PLUS_SYSTEM_PROMPT,
    instruction_separator=" ",
    # granite-speech-4.1-2b-plus card (https://huggingface.co/ibm-granite/granite-speech-4.1-2b-plus):
    # speaker attribution works on calls of up to 9 minutes (its WDER is averaged over segments of 2 to 5
    # minutes) and word timestamps on calls of up to 5 minutes. Some third-party copies of the card read
    # 3.5 minutes for timestamps; the card itself is taken. Plus runs at 3-minute calls by default: within
    # the 2-5 minutes IBM evaluated speakers on and every limit, and short enough that a speaker session
    # (audio/sessions.py) keeps three calls of context inside the 9-minute limit, each call with its own
    # 2,000-token budget (a 9-minute call of fast speech would need about that for its words alone).
    segment_s=180.0,
    max_call_s=540.0,
    max_speakers_call_s=540.0,
    max_word_times_call_s=300.0,
    # The card's `transcribe(audio, prompt, max_new_tokens=2000, ...)` and
    # `transcribe(audio.data, TS_PROMPT, max_new_tokens=10000)`
    # (https://huggingface.co/ibm-granite/granite-speech-4.1-2b-plus, usage section): a `[T:N]` tag
    # after every word takes several tokens per word, so 16 + 12 per second cut it short.
    asr_new_tokens=2000,
    word_times_new_tokens=10000,
)
GRANITE_SPEECH5_CTC = ModelProfile(
    name="granite-speech-5-ctc",
    engine=CTC,
    asr_languages=frozenset({"en"}),  # card: English ASR
    # No VAD: a CTC model needs no whole utterances (its blank frames absorb silence and a cut only has
    # to fall between words), and the VAD costs as much CPU as decoding (benchmarks/bench_cpu_cost.py).
    vad=False,
)
# For a granite_speech* type this code has never seen: what every Granite Speech model does.
CONSERVATIVE = ModelProfile(name="granite-speech-unknown", engine=GENERATE, asr_languages=frozenset({"en"}))

PROFILES = {
    p.name: p for p in (GRANITE_SPEECH, GRANITE_SPEECH_41, GRANITE_SPEECH_PLUS, GRANITE_SPEECH5_CTC, CONSERVATIVE)
}
BY_MODEL_TYPE = {
    "granite_speech": GRANITE_SPEECH,
    "granite_speech_plus": GRANITE_SPEECH_PLUS,
    "granite_speech5_ctc": GRANITE_SPEECH5_CTC,
}


def profile_for(model_type: str, name: str = "") -> ModelProfile:
    """The profile of a checkpoint whose config says `model_type`, named `name` (hub id or folder)."""
    if model_type == "granite_speech" and "4.1" in os.path.basename(name.rstrip("/")):
        return GRANITE_SPEECH_41
    if model_type in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[model_type]
    if model_type.startswith("granite_speech"):
        log.warning(
            "model type %r is not known to this job: using the most conservative profile (%s: %s ASR "
            "only); set profile: in the job config if you know better",
            model_type,
            CONSERVATIVE.name,
            " ".join(sorted(CONSERVATIVE.asr_languages)),
        )
        return CONSERVATIVE
    raise ValueError(
        f"model type {model_type!r} is not a Granite Speech model (known: {', '.join(sorted(BY_MODEL_TYPE))})"
    )


class UnsupportedModel(ValueError):
    """A Granite Speech checkpoint this job cannot run as IBM runs it; str() says why and what to use."""


# granite-speech-3.3 (2b, 8b) ships a LoRA that transformers switches on only when audio is given, and
# only with peft installed (transformers `models/granite_speech/modeling_granite_speech.py` `generate`;
# `docs/source/en/model_doc/granite_speech.md`: "Be sure to install PEFT"); IBM prompts it with a system
# turn (its card, and the Open ASR leaderboard's `granite/run_eval.py`). The job's batched decoding runs
# the language model on embeddings with no adapter switch, so it would silently run 3.3 without its LoRA.
LORA_REFUSAL = (
    "checkpoints with a LoRA adapter (granite-speech-3.3: has_lora_adapter is true in its config) are not "
    "supported: IBM runs them with peft, the adapter on for audio, and a system turn, which this job does "
    "not do; use granite-4.0-1b-speech, granite-speech-4.1-2b, granite-speech-4.1-2b-plus or "
    "granite-speech-5.0-470m-turboctc"
)


def read_config(name: str, revision: str | None = None, trust_remote_code: bool = False) -> dict:
    """The checkpoint's config.json as a dict: read from a local folder, else via transformers."""
    config_file = Path(name) / "config.json"
    if config_file.is_file():
        return json.loads(config_file.read_text(encoding="utf-8"))
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(
        name, revision=revision, trust_remote_code=trust_remote_code, **hub_options(name)
    ).to_dict()


def read_model_type(name: str, revision: str | None = None, trust_remote_code: bool = False) -> str:
    """`model_type` from the checkpoint's config.json."""
    return read_config(name, revision, trust_remote_code).get("model_type", "")


def check_supported(config: dict) -> None:
    """Raise UnsupportedModel for a checkpoint the job cannot run as IBM does (a LoRA checkpoint).
    Published configs always carry `has_lora_adapter` (transformers writes it: it is not a base-config
    key); a hand-written config without it is taken as having none."""
    if config.get("model_type", "").startswith("granite_speech") and config.get("has_lora_adapter") is True:
        raise UnsupportedModel(LORA_REFUSAL)


def detect_profile(
    name: str, revision: str | None = None, trust_remote_code: bool = False, override: str | None = None
) -> ModelProfile:
    """The profile of checkpoint `name` (hub id or folder), or the one named by `override`; raises
    UnsupportedModel for a checkpoint with a LoRA adapter (granite-speech-3.3), whatever the override."""
    config = read_config(name, revision, trust_remote_code)
    check_supported(config)
    if override and override != "auto":
        if override not in PROFILES:
            raise ValueError(f"unknown profile {override!r} (known: {', '.join(PROFILES)})")
        return PROFILES[override]
    return profile_for(config.get("model_type", ""), name)


def route(request: Request, models: list[tuple[str, ModelProfile]]) -> tuple[int | None, str | None]:
    """(index of the first of `models` (name, profile) that serves `request`, None), or (None, the row's
    error naming what each model lacks)."""
    missing = []
    for index, (name, profile) in enumerate(models):
        lack = profile.unsupported(request)
        if lack is None:
            return index, None
        missing.append(f"{name} has no {lack}")
    return None, "no listed model serves this row: " + "; ".join(missing)
