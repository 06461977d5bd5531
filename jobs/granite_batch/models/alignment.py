"""Word times and confidences for a segment's text, from CTC posteriors over its encoder frames.

Two sources:

- `align_words`: the text an LLM-based Granite Speech model generated, force-aligned
  (`torchaudio.functional.forced_align`, Viterbi over the CTC trellis) to the log-posteriors of the
  encoder's CTC head, which the model computes anyway. IBM's speculative-decoding notebook reads
  that head as character classes: class 0 is the blank and class c is `chr(c)`
  (`''.join(chr(c) for c in non_blank)`, ibm-granite/granite-speech-models,
  notebooks/speculative_decoding_notebook.ipynb, `ctc_decode`); granite-4.0-1b-speech has 348 of
  them, 256 byte values and 92 katakana whose mapping is not published.
- `words_from_ctc_path`: a CTC model's own greedy frame path (one token id per frame).

Text the head cannot spell never fails: a run of characters without a class of their own (digits,
kana, kanji, symbols a word is made of) is one wildcard target that matches any non-blank class,
the "star" token of the MMS/torchaudio forced-alignment recipes, so it takes the frames where
something was said between its aligned neighbours. Punctuation inside a word is not aligned. When
the text cannot be aligned at all (more targets than frames, or no posteriors), the words share the
segment's span in proportion to their lengths and carry no confidence.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass

BLANK = 0
SPACE = ord(" ")
# Characters of scripts written without spaces between words (Japanese, Chinese; their punctuation and
# full-width forms): a run of them is cut into words after its punctuation.
UNSPACED_SCRIPT = re.compile(r"[\u3000-\u303f\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uff01-\uff9f]")
_UNSPACED_BREAK = re.compile(r"(?<=[、。，．！？!?,.」』）])")
# Word pieces of sentencepiece (`▁`) and byte-level BPE (`Ġ`) vocabularies that start a word.
_WORD_START_MARKS = ("▁", "Ġ", " ")


@dataclass(frozen=True)
class Word:
    """One word of a segment: seconds from the recording's start, its text as generated, and the
    mean posterior probability of its aligned characters (None where nothing was aligned)."""

    start: float
    end: float
    text: str
    confidence: float | None = None

    def as_dict(self) -> dict:
        return {"start": self.start, "end": self.end, "text": self.text, "confidence": self.confidence}


def encoder_frame_s(audio_processor) -> float:
    """Seconds per encoder frame of a Granite Speech feature extractor: its mel hop, two mel
    frames stacked per encoder frame (20 ms for 4.0-1b: hop 160 at 16 kHz)."""
    hop = audio_processor.melspec_kwargs["hop_length"]
    return 2 * hop / audio_processor.sampling_rate


def split_words(text: str) -> list[str]:
    """The words of `text`: whitespace-separated, and Japanese/Chinese runs cut after their
    punctuation (those scripts put no space between words). Joined, they give `text` back up to
    whitespace."""
    words = []
    for token in text.split():
        if UNSPACED_SCRIPT.search(token):
            words.extend(piece for piece in _UNSPACED_BREAK.split(token) if piece)
        else:
            words.append(token)
    return words


def proportional_words(words: Sequence[str], start_s: float, end_s: float) -> list[Word]:
    """`words` spread over [start_s, end_s] in proportion to their lengths (no confidence)."""
    if not words:
        return []
    weights = [max(1, len(w)) for w in words]
    total = sum(weights)
    span = max(end_s - start_s, 1e-3 * len(words))
    out, at = [], start_s
    for word, weight in zip(words, weights):
        step = span * weight / total
        out.append(_word(at, at + step, word, None, start_s, start_s + span))
        at += step
    return out


def _word(start: float, end: float, text: str, confidence: float | None, lo: float, hi: float) -> Word:
    """A Word with times rounded to milliseconds, kept inside [lo, hi]."""
    return Word(
        max(lo, round(start, 3)), min(hi, round(end, 3)), text, None if confidence is None else round(confidence, 4)
    )


def _units(word: str, classes: int) -> list[object]:
    """Alignment targets of one word: a lower-case letter for a character the head has a class for
    (either case), "*" for each run of other letters/digits, nothing for punctuation; a word with no
    target at all (a lone symbol, "&") is one wildcard."""
    units: list[object] = []
    for char in word:
        lower, upper = char.lower(), char.upper()
        spelled = char.isalpha() and any(
            len(c) == 1 and 0 < ord(c) < min(classes, 256) and ord(c) != SPACE for c in (lower, upper)
        )
        if spelled:
            units.append(lower if len(lower) == 1 else char)
        elif char.isalnum() or unicodedata.category(char).startswith("M"):
            if not units or units[-1] != "*":
                units.append("*")
    return units or ["*"]


def align_words(log_probs, text: str, frame_s: float, start_s: float = 0.0, end_s: float | None = None) -> list[Word]:
    """Words of `text` with times (seconds from the recording's start: `start_s` is the segment's
    first sample) and confidences, by forced alignment to `log_probs`, the CTC head's
    log-posteriors [frames, classes] over the segment (a torch tensor, any device).

    Each word spans the frames of its first to last aligned target (at least one frame), inside
    [start_s, end_s]; its confidence is the mean probability of its letters' frames (None for a
    word of wildcards only). Falls back to `proportional_words` when the text cannot be aligned.
    """
    words = split_words(text)
    frames = 0 if log_probs is None else int(log_probs.shape[0])
    end_s = start_s + frames * frame_s if end_s is None else end_s
    if not words:
        return []
    if frames == 0:
        return proportional_words(words, start_s, end_s)
    import torch
    from torchaudio.functional import forced_align

    log_probs = log_probs.float()
    classes = log_probs.shape[1]
    per_word = [_units(w, classes) for w in words]
    letters = sorted({u for units in per_word for u in units if u != "*"})
    space = SPACE < classes
    # Columns of the aligned emission: blank, wildcard, [space], one per letter (its cases merged).
    column = {"*": 1, **({" ": 2} if space else {})}
    for letter in letters:
        column[letter] = len(column) + 1
    targets, owner = [], []
    for index, units in enumerate(per_word):
        if space and index:
            targets.append(column[" "])
            owner.append(None)
        for unit in units:
            targets.append(column[unit])
            owner.append(index)
    repeats = sum(a == b for a, b in zip(targets, targets[1:]))
    if len(targets) + repeats > frames:
        return proportional_words(words, start_s, end_s)

    def class_ids(letter: str) -> list[int]:
        return sorted({ord(c) for c in (letter, letter.upper()) if len(c) == 1 and 0 < ord(c) < classes})

    non_blank = torch.ones(classes, dtype=torch.bool, device=log_probs.device)
    non_blank[BLANK] = False
    if space:
        non_blank[SPACE] = False
    columns = [log_probs[:, BLANK], torch.logsumexp(log_probs[:, non_blank], dim=-1)]
    if space:
        columns.append(log_probs[:, SPACE])
    columns += [torch.logsumexp(log_probs[:, class_ids(letter)], dim=-1) for letter in letters]
    emission = torch.stack(columns, dim=-1).unsqueeze(0)
    path, scores = forced_align(
        emission, torch.tensor([targets], dtype=torch.int32, device=emission.device), blank=BLANK
    )
    spans = _token_spans(path[0].tolist(), scores[0].exp().tolist())
    first = [math.inf] * len(words)
    last = [-math.inf] * len(words)
    probabilities: list[list[float]] = [[] for _ in words]
    # The path visits the targets in order, one span each (repeats are split by a blank).
    for (_label, frame_start, frame_end, probability), index, target in zip(spans, owner, targets):
        if index is None:
            continue
        first[index] = min(first[index], frame_start)
        last[index] = max(last[index], frame_end)
        if target != column["*"]:
            probabilities[index].append(probability)
    out = []
    for index, word in enumerate(words):
        start = min(start_s + first[index] * frame_s, end_s - frame_s)
        end = min(max(start_s + last[index] * frame_s, start + frame_s), end_s)
        confidence = sum(probabilities[index]) / len(probabilities[index]) if probabilities[index] else None
        out.append(_word(start, end, word, confidence, start_s, end_s))
    return out


def _token_spans(
    path: Sequence[int], probabilities: Sequence[float] | None = None
) -> list[tuple[int, int, int, float | None]]:
    """(label, first frame, frame after the last, mean probability) of each non-blank run of a CTC path."""
    spans = []
    start = 0
    for frame in range(1, len(path) + 1):
        if frame == len(path) or path[frame] != path[start]:
            if path[start] != BLANK:
                mean = None if probabilities is None else sum(probabilities[start:frame]) / (frame - start)
                spans.append((path[start], start, frame, mean))
            start = frame
    return spans


def words_from_ctc_path(
    frame_ids: Sequence[int],
    pieces: Sequence[str],
    frame_s: float,
    start_s: float = 0.0,
    blank_id: int = BLANK,
    frame_probs: Sequence[float] | None = None,
    decode: Callable[[list[int]], str] | None = None,
) -> list[Word]:
    """Words of a CTC model's greedy path: `frame_ids` is the argmax token id of each frame,
    `pieces[id]` the text of a token (a character, or a word piece that starts a word with `▁`, `Ġ`
    or a space; a piece that is only a space separates words). A word spans its first token's first
    frame to its last token's last frame; with `frame_probs` (the chosen token's probability per
    frame) its confidence is the mean over its tokens of their frames' mean probability.

    `pieces` only say where words start. With `decode` (token ids -> text, the tokenizer's own decode)
    a word's text is its tokens decoded together, so it is spelled as the decoded transcript is
    (a byte-level piece `ĠrÃ¡pid` is `rápid`); without it, the pieces are joined as they are."""
    path = [BLANK if i == blank_id else i + 1 for i in frame_ids]  # shift so that blank is 0 here
    spans = _token_spans(path, frame_probs)
    words: list[Word] = []
    text, first, last, probabilities = "", None, None, []
    ids: list[int] = []

    def close():
        word = decode(ids) if decode is not None and ids else text
        if word.strip():
            confidence = sum(probabilities) / len(probabilities) if probabilities else None
            words.append(
                Word(
                    round(start_s + first * frame_s, 3),
                    round(start_s + last * frame_s, 3),
                    word.strip(),
                    None if confidence is None else round(confidence, 4),
                )
            )

    for label, frame_start, frame_end, probability in spans:
        piece = pieces[label - 1]
        if piece.startswith(_WORD_START_MARKS) or not piece.strip():
            close()
            text, first, probabilities, ids = "", None, [], []
            piece = piece.lstrip("".join(_WORD_START_MARKS))
            if not piece:
                continue
        if first is None:
            first = frame_start
        text += piece
        ids.append(label - 1)  # the token id (labels here are ids + 1, 0 the blank)
        last = frame_end
        if probability is not None:
            probabilities.append(probability)
    close()
    return words
