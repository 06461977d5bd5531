"""Quality of one decoded segment, from what decoding already computed (no second model pass).

Pure functions on a segment's text, duration and frame labels; docs/reference/output-schema and
docs/how-to/cascade.md say what each figure means and where its thresholds come from.

- `repetition`: the text loops. Two checks: an n-gram repeated back to back (a decoder stuck in a
  loop), and Whisper's own hallucination test, a zlib compression ratio over 2.4
  (openai/whisper `transcribe.py`, `compression_ratio_threshold=2.4`).
- `rate`: characters per second of the segment outside its language's usual range: far too many is
  text invented beyond what was said, far too few is speech dropped. Speech carries about 5-8
  syllables a second across languages (Pellegrino, Coupé & Marsico 2011, "A cross-language
  perspective on speech information rate", Language 87(3)); the bounds below are several times wider.
- `speech_ratio`: the share of a segment's CTC frames that are not in a pause, a pause being a run of
  blank labels of at least PAUSE_S (CTC labels are spikes: short blank runs sit between letters of
  running speech, long ones are silence).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass

from granite_batch.models.confidence import low_confidence
from granite_batch.models.prompts import UNSPACED_LANGUAGES

# Whisper's threshold on len(text) / len(zlib(text)) above which it calls a decoding a repetition loop.
COMPRESSION_RATIO_LIMIT = 2.4
# Shorter texts compress too little for the ratio to mean anything.
COMPRESSION_MIN_CHARS = 40
# A loop: an n-gram of at most MAX_LOOP_N tokens repeated LOOP_REPEATS times back to back, covering at
# least LOOP_TOKENS tokens (so "very very very" and a stutter are not loops). Tokens are words, or
# characters for languages written without spaces.
MAX_LOOP_N = 12
LOOP_REPEATS = 3
LOOP_TOKENS = 6
UNSPACED_LOOP_TOKENS = 12

# Characters per second (whitespace excluded) that a segment's text may have; outside, `rate` is set.
# English at 150 words a minute is about 12 letters a second; Japanese and Mandarin write a syllable
# or a word in one character.
RATE_RANGE_CHARS_PER_S = {"ja": (0.5, 14.0), "zh": (0.5, 12.0)}
DEFAULT_RATE_RANGE_CHARS_PER_S = (1.5, 28.0)
# Shorter segments (and silence, where there is no text) are not judged on their rate.
MIN_RATE_S = 1.0

# A run of blank CTC labels at least this long is a pause, not the gap between two letters.
PAUSE_S = 0.3

# What `escalate_on` may name (config.ModelSpec): the flags known when a segment leaves its model.
ESCALATION_FLAGS = ("low_confidence", "repetition", "truncated", "rate")


@dataclass(frozen=True)
class SegmentQuality:
    """The quality fields of one segment (schema.QUALITY_TYPE)."""

    low_confidence: bool | None
    repetition: bool
    chars_per_s: float | None
    rate: bool
    speech_ratio: float | None

    def flags(self, truncated: bool) -> list[str]:
        """The ESCALATION_FLAGS this segment raises, in their order."""
        raised = {
            "low_confidence": bool(self.low_confidence),
            "repetition": self.repetition,
            "truncated": truncated,
            "rate": self.rate,
        }
        return [flag for flag in ESCALATION_FLAGS if raised[flag]]


def tokens(text: str, language: str | None) -> list[str]:
    """Words, or the characters of a language written without spaces."""
    if language in UNSPACED_LANGUAGES:
        return [c for c in text if not c.isspace()]
    return text.lower().split()


def longest_loop(items: Sequence[str], max_n: int = MAX_LOOP_N) -> tuple[int, int]:
    """(n, repeats) of the n-gram repeated back to back over the most tokens; (0, 0) for none.

    One pass per n: a run of L positions where items[i] == items[i + n] is a stretch of period n,
    L + n tokens long, so (L + n) // n copies of its first n-gram."""
    best = (0, 0)
    for n in range(1, max_n + 1):
        run = 0
        for i in range(len(items) - n + 1):
            if i + n < len(items) and items[i] == items[i + n]:
                run += 1
                continue
            repeats = (run + n) // n
            if repeats > 1 and n * repeats > best[0] * best[1]:
                best = (n, repeats)
            run = 0
    return best


def compression_ratio(text: str) -> float:
    """len(text) / len(zlib(text)), in UTF-8 bytes (as Whisper computes it)."""
    data = text.encode("utf-8")
    return len(data) / len(zlib.compress(data)) if data else 0.0


def repetition(text: str, language: str | None) -> bool:
    """Whether `text` is a decoding loop: an n-gram repeated back to back, or text that compresses
    like one."""
    items = tokens(text, language)
    n, repeats = longest_loop(items)
    least = UNSPACED_LOOP_TOKENS if language in UNSPACED_LANGUAGES else LOOP_TOKENS
    if repeats >= LOOP_REPEATS and n * repeats >= least:
        return True
    return len(text) >= COMPRESSION_MIN_CHARS and compression_ratio(text) > COMPRESSION_RATIO_LIMIT


def chars_per_s(text: str, duration_s: float) -> float | None:
    """Characters (whitespace excluded) per second of the segment; None for an empty segment."""
    if duration_s <= 0:
        return None
    return round(sum(not c.isspace() for c in text) / duration_s, 3)


def rate_outlier(text: str, duration_s: float, language: str | None) -> bool:
    """Whether the text has far more or far fewer characters than `duration_s` of speech in
    `language` holds (RATE_RANGE_CHARS_PER_S). Empty text is not judged (silence is no outlier)."""
    rate = chars_per_s(text, duration_s)
    if rate is None or duration_s < MIN_RATE_S or not text.strip():
        return False
    low, high = RATE_RANGE_CHARS_PER_S.get(language or "", DEFAULT_RATE_RANGE_CHARS_PER_S)
    return not low <= rate <= high


def speech_ratio(frame_ids: Sequence[int], blank_id: int, frame_s: float) -> float | None:
    """The share of frames outside pauses (runs of blanks of at least PAUSE_S); None without frames."""
    if not frame_ids:
        return None
    pause_frames = max(1, round(PAUSE_S / frame_s))
    paused, run = 0, 0
    for label in list(frame_ids) + [None]:
        if label == blank_id:
            run += 1
            continue
        if run >= pause_frames:
            paused += run
        run = 0
    return round(1.0 - paused / len(frame_ids), 4)


def emitted_logprob(frame_ids: Sequence[int], frame_logprobs: Sequence[float], blank_id: int) -> float | None:
    """A CTC segment's confidence: the mean log-probability of its greedy labels over the frames that
    emit a label (blanks left out, as NeMo's CTC confidence does with `exclude_blank`: blank frames are
    confident almost everywhere and would hide an unsure word). None when no frame emits one."""
    chosen = [lp for label, lp in zip(frame_ids, frame_logprobs) if label != blank_id]
    return round(sum(chosen) / len(chosen), 4) if chosen else None


def segment_quality(
    text: str,
    duration_s: float,
    language: str | None,
    avg_logprob: float | None,
    speech: float | None = None,
) -> SegmentQuality:
    """The quality fields of a segment of `duration_s` seconds whose text is in `language`."""
    return SegmentQuality(
        low_confidence=None if avg_logprob is None else low_confidence(avg_logprob),
        repetition=repetition(text, language),
        chars_per_s=chars_per_s(text, duration_s),
        rate=rate_outlier(text, duration_s, language),
        speech_ratio=speech,
    )
