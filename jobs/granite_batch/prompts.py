"""Languages, tasks and the instruction text Granite Speech is prompted with.

Sources for the instruction texts:
- ASR: `<|audio|>can you transcribe the speech into a written format?` as the only user turn, no
  system prompt: IBM's granite-speech-models `notebooks/speculative_decoding_notebook.ipynb` and the
  granite-4.0-1b-speech model card.
- Keyword biasing: the instruction followed by `Keywords: kw1, kw2`, with ". " inserted only when the
  instruction does not already end in punctuation and keywords de-duplicated (IBM's own library, as
  recorded in ../shared/FACTS.md).
- AST: `<|audio|>translate the speech to {Language}`: the form vLLM's Granite Speech example and the
  granite-4.1 card use (the 4.0 card shows no translation prompt).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

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
    if language not in ASR_LANGUAGES:
        return f"unsupported language: {language!r} (supported: {' '.join(ASR_LANGUAGES)})"
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
        return ("ja -> en translation is not in granite-4.0-1b-speech's training (its card lists no "
                "Japanese-to-English data; granite-speech-4.1-2b's card does)")
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
