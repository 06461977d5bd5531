"""Reading granite-speech-4.1-2b-plus's tagged transcripts into segments with speakers and words.

The tags, from the 4.1-2b-plus card and transformers' granite_speech_plus.md usage section:
- speaker attribution: `[Speaker N]:` before each speaker turn, speakers numbered by order of
  appearance within the call ("[Speaker 1]: hello how are you [Speaker 2]: I'm fine");
- word-level timestamps: `[T:N]` after each word, N its end time in centiseconds, modulo 1000 (10 s),
  unwrapped "by adding multiples of 10 seconds" as the docs' example does; silences are written `_`
  and also end in a tag.

A label is written as `<n>:<N>`: `n` the row's segment index within the recording (for speaker
attribution, a speaker session of calls decoded in order with the transcript so far, which keeps the
numbering through the session: audio/sessions.py, inference/transcribe.py), then the model's speaker
number; across sessions no diarisation is done, so `0:1` and `1:1` need not be one person.
A speaker turn becomes its own segment; without word times its time span is the call's span
shared out by its share of the call's characters (an estimate; with word times, its words' span).

Whatever the model writes, parsing never raises: tags that do not match are kept as text (a lone
`[T:x]` or `[Speaker]`), times that run backwards are unwrapped or held, times past the call's end
are clamped to it, and text after the last time tag is kept in the text without a word time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# A speaker tag or a time tag; anything else in brackets is text.
TAG = re.compile(r"\[Speaker\s*(\d+)\]\s*:?|\[T:\s*(\d+)\s*\]")
SILENCE = "_"
WRAP_S = 10.0  # [T:N] is centiseconds modulo 1000


@dataclass
class Part:
    """One output segment made from a tagged call: seconds from the start of the recording."""

    start: float
    end: float
    text: str
    speaker: str | None = None
    words: list[dict] | None = None  # [{start, end, text}] when word times were asked for
    texts: list[str] = field(default_factory=list, repr=False)


def tagged_parts(text: str, start_s: float, end_s: float, call: int, speakers: bool, word_times: bool) -> list[Part]:
    """The output segments of one tagged call spanning [start_s, end_s] of the recording: one per
    speaker turn (`speakers`), each with its timed words (`word_times`). Tags not asked for are
    dropped from the text. Never raises, whatever the text."""
    try:
        return _parts(text, start_s, end_s, call, speakers, word_times)
    except Exception:  # a model's text must never fail its row: keep the text, tags stripped
        return [Part(start_s, end_s, " ".join(TAG.sub(" ", text).split()), words=[] if word_times else None)]


def _parts(text: str, start_s: float, end_s: float, call: int, speakers: bool, word_times: bool) -> list[Part]:
    duration = max(0.0, end_s - start_s)
    parts = [Part(start_s, start_s, "", None, [] if word_times else None)]  # text before any speaker tag
    pending: list[str] = []  # words since the last time tag
    previous = offset = 0.0  # the call's clock: last word end, and the unwrapped multiples of 10 s
    position = 0
    for match in list(TAG.finditer(text)) + [None]:
        chunk = text[position : match.start() if match else len(text)]
        pending += [word for word in chunk.split() if word != SILENCE]
        if match is None:
            break
        position = match.end()
        speaker, centiseconds = match.group(1), match.group(2)
        if speaker is not None and speakers:
            parts[-1].texts += pending
            pending = []
            parts.append(Part(start_s, start_s, "", f"{call}:{int(speaker)}", [] if word_times else None))
        elif centiseconds is not None and word_times:
            at = int(centiseconds) / 100.0
            while at + offset < previous and at + offset + WRAP_S <= duration + WRAP_S:
                offset += WRAP_S  # the clock wrapped at 10 s
            end = min(max(at + offset, previous), duration)
            if pending:
                spoken = " ".join(pending)
                parts[-1].words.append(
                    {"start": round(start_s + previous, 3), "end": round(start_s + end, 3), "text": spoken}
                )
                parts[-1].texts.append(spoken)
                pending = []
            previous = end
    parts[-1].texts += pending  # after the last tag: text without a time
    if len(parts) > 1 and not parts[0].texts:
        parts.pop(0)
    for part in parts:
        part.text = " ".join(part.texts)
    if word_times:
        cursor = start_s
        for part in parts:
            if part.words:
                part.start, part.end = part.words[0]["start"], part.words[-1]["end"]
            else:
                part.start = part.end = cursor
            cursor = part.end
    else:
        _share_span(parts, start_s, end_s)
    return parts


def _share_span(parts: list[Part], start_s: float, end_s: float) -> None:
    """Without word times: each turn gets the call's span shared out by its characters (an estimate)."""
    total = sum(len(part.text) for part in parts) or 1
    cursor = start_s
    for part in parts:
        part.start = round(cursor, 3)
        cursor += (end_s - start_s) * len(part.text) / total
        part.end = round(cursor, 3)
    parts[-1].end = end_s
