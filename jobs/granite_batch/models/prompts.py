"""Languages, tasks and the instruction text Granite Speech is prompted with.

Sources for the instruction texts:
- ASR: `<|audio|>can you transcribe the speech into a written format?` as the only user turn, no
  system prompt: IBM's granite-speech-models `notebooks/speculative_decoding_notebook.ipynb` and the
  granite-4.0-1b-speech model card.
- Keyword biasing: the instruction followed by `Keywords: kw1, kw2`, with ". " inserted only when the
  instruction does not already end in punctuation and keywords de-duplicated (IBM's own Granite Speech
  inference code).
- AST: `<|audio|>translate the speech to {Language}`: the form vLLM's Granite Speech example and the
  granite-4.1 card use (the 4.0 card shows no translation prompt).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, replace

AUDIO_TOKEN = "<|audio|>"
ASR_INSTRUCTION = "can you transcribe the speech into a written format?"
AST_INSTRUCTION = "translate the speech to {language}"

ASR_LANGUAGES = ("en", "fr", "de", "es", "pt", "ja")
LANGUAGE_NAMES = {
    "en": "English",
    "fr": "French",
    "de": "German",
    "es": "Spanish",
    "pt": "Portuguese",
    "ja": "Japanese",
    "it": "Italian",
    "zh": "Mandarin",
}
# Speech translation pairs the contract supports: fr de es pt ja -> en, en -> fr de es pt ja it zh.
AST_PAIRS = frozenset({(src, "en") for src in ("fr", "de", "es", "pt", "ja")}) | frozenset(
    {("en", tgt) for tgt in ("fr", "de", "es", "pt", "ja", "it", "zh")}
)
TASKS = ("asr", "ast")
# `language: auto`: transcribe with the language-neutral ASR prompt, then identify the transcript's
# language (language_id.py); `und` is the partition of rows whose language stayed unknown.
AUTO_LANGUAGE = "auto"
UNDETERMINED_LANGUAGE = "und"
# Written without spaces between words: segments join without spaces, and scoring counts characters.
UNSPACED_LANGUAGES = frozenset({"ja", "zh"})

# Anything that looks like a special token (`<|audio|>`, `<|start_of_role|>`, ...) or a line break
# would change the prompt's structure or its number of audio tokens if it reached the template.
_SPECIAL_TOKEN = re.compile(r"<\|[^|>]*\|>|<\||\|>")
_WHITESPACE = re.compile(r"\s+")


def check_request(language: str, task: str, target_language: str | None) -> str | None:
    """Return why (language, task, target_language) cannot be served, or None when it can."""
    if task not in TASKS:
        return f"unsupported task: {task!r} (use asr or ast)"
    if language == AUTO_LANGUAGE:
        if task == "ast":
            # A translation is in the target language: nothing in it says which language was spoken.
            return (
                "language auto needs task asr: the spoken language is identified from a transcript, "
                "so a translation row must name its language"
            )
        return None
    if language not in ASR_LANGUAGES:
        return f"unsupported language: {language!r} (supported: {' '.join(ASR_LANGUAGES)} or auto)"
    if task == "ast":
        if not target_language:
            return "missing target_language: task ast needs a target_language"
        if (language, target_language) not in AST_PAIRS:
            return f"unsupported translation pair: {language} -> {target_language}"
    return None


def unlisted_request(language: str, task: str, target_language: str | None, keywords) -> str | None:
    """Why IBM's model card does not vouch for this servable request, or None.

    Such rows are served (the 4.1 card lists what 4.0's does not), and the manifest reader warns
    with their count. granite-4.0-1b-speech's card trains AST De/Es/Fr/Pt->En and
    En->De/Es/Fr/It/Ja/Pt/Zh (no Ja->En; granite-speech-4.1-2b's card translates both ways), and its
    keyword biasing is "keyword-biased ASR" on both cards: no card shows keywords on a translation.
    """
    if task != "ast":
        return None
    if (language, target_language) == ("ja", "en"):
        return (
            "ja -> en translation is not in granite-4.0-1b-speech's training (its card lists no "
            "Japanese-to-English data; granite-speech-4.1-2b's card does)"
        )
    if keywords:
        return "keywords on a translation: IBM's model cards describe keyword biasing for transcription (asr) only"
    return None


def clean_keyword(keyword: str) -> str:
    """A keyword as it may appear in a prompt: no special-token markup, no line breaks."""
    return _WHITESPACE.sub(" ", _SPECIAL_TOKEN.sub(" ", keyword)).strip()


def clean_keywords(keywords: list[str] | None) -> list[str]:
    """Cleaned, de-duplicated (first occurrence wins), empty ones dropped."""
    seen: dict[str, None] = {}
    for keyword in keywords or []:
        cleaned = clean_keyword(keyword)
        if cleaned:
            seen.setdefault(cleaned, None)
    return list(seen)


@dataclass(frozen=True)
class Request:
    """What one recording asks of the model."""

    task: str = "asr"
    target_language: str | None = None
    keywords: tuple[str, ...] = ()
    language: str | None = None  # spoken language: not in the prompt, but decides CTC drafting
    punctuation: bool = False  # a punctuated transcript, where the model has that prompt (profiles.py)
    speakers: bool = False  # speaker-attributed transcript (`[Speaker N]:`), where the model has it
    word_times: bool = False  # the model's own word end times (`[T:N]`), where it has them
    # The transcript so far, which the chat template writes after the assistant's turn marker for the
    # model to continue (4.1-2b-plus's incremental speaker attribution; inference/transcribe.py).
    prefix_text: str | None = None


def instruction(request: Request) -> str:
    """The user turn: the audio placeholder followed by the instruction text."""
    if request.task == "ast":
        text = AST_INSTRUCTION.format(language=LANGUAGE_NAMES[request.target_language])
    else:
        text = ASR_INSTRUCTION
    keywords = clean_keywords(list(request.keywords))
    if keywords:
        separator = " " if text[-1] in ".?!" else ". "
        text = f"{text}{separator}Keywords: {', '.join(keywords)}"
    return AUDIO_TOKEN + text


def render_prompt(tokenizer, request: Request) -> str:
    """The full prompt string through the model's own chat template."""
    messages = [{"role": "user", "content": instruction(request)}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class PromptTooLong(ValueError):
    """A row's prompt, audio and new tokens do not fit the model's context even without keywords;
    str() is the reason for the output row."""


def audio_token_count(audio_processor, samples: int) -> int:
    """How many `<|audio|>` positions the processor expands a segment of `samples` into: its own
    computation (GraniteSpeechFeatureExtractor._get_num_audio_features; for 4.0-1b about 10 per
    second), so the count is the one generation will see."""
    return int(audio_processor._get_num_audio_features([samples])[0])


def prompt_positions(tokenizer, request: Request, audio_tokens: int, profile=None) -> int:
    """Positions the rendered prompt of `request` takes once its one `<|audio|>` token is expanded
    into `audio_tokens` of them (rendered by `profile.render_prompt` when a model profile is given)."""
    return _text_positions(tokenizer, request, profile) - 1 + audio_tokens


@functools.lru_cache(maxsize=4096)
def _text_positions(tokenizer, request: Request, profile=None) -> int:
    # Cached: most rows of a job share one request, so each costs a lookup, not a tokenizer call.
    prompt = render_prompt(tokenizer, request) if profile is None else profile.render_prompt(tokenizer, request)
    return len(tokenizer(prompt)["input_ids"])


def fit_keywords(
    tokenizer, request: Request, audio_tokens: int, new_tokens: int, max_positions: int, profile=None
) -> tuple[Request, int]:
    """`request` with as many of its cleaned keywords (in order, the first kept) as let the prompt,
    `audio_tokens` audio positions and `new_tokens` generated ones fit in `max_positions` (the text
    model's `max_position_embeddings`); and how many keywords were dropped. Raises PromptTooLong
    when they do not fit even without keywords."""
    keywords = tuple(clean_keywords(list(request.keywords)))
    request = replace(request, keywords=keywords)

    def fits(count: int) -> bool:
        trial = replace(request, keywords=keywords[:count])
        return prompt_positions(tokenizer, trial, audio_tokens, profile) + new_tokens <= max_positions

    if fits(len(keywords)):
        return request, 0
    if not fits(0):
        needed = prompt_positions(tokenizer, replace(request, keywords=()), audio_tokens, profile) + new_tokens
        raise PromptTooLong(
            f"prompt too long: {needed} positions (prompt, {audio_tokens} audio, {new_tokens} new tokens) "
            f"exceed the model's {max_positions} (shorten max_segment_s or max_new_tokens)"
        )
    # Positions grow with the keyword count: the most that fit, by bisection (a few tokenizer calls).
    low, high = 0, len(keywords)  # fits(low), not fits(high)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return replace(request, keywords=keywords[:low]), len(keywords) - low
