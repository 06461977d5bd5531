"""Quality of transcripts and translations against the manifest's `reference` column.

- ASR: WER after Whisper's text normalisers, as the Open ASR leaderboard scores it: the English
  normaliser (spellings, numbers, contractions) for `en`, the basic multilingual one elsewhere.
  Languages written without spaces (`ja`, `zh`) get CER instead, on the normalised text with the
  whitespace removed.
- AST: sacrebleu BLEU with sacrebleu's tokenizer for the target language (`ja-mecab` for Japanese,
  `zh` for Chinese, `13a` otherwise) and chrF, on the raw text, as WMT scores them.

Every figure is corpus-level: errors summed over all rows of a group divided by the summed
reference length (jiwer over all pairs, sacrebleu's corpus scores), never a mean of row scores.
Only plain Python on Arrow tables here: no Ray.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from functools import cache

import jiwer
import pyarrow as pa
import sacrebleu
from whisper_normalizer.basic import BasicTextNormalizer
from whisper_normalizer.english import EnglishTextNormalizer

from granite_batch.models.prompts import UNSPACED_LANGUAGES

NEEDED_COLUMNS = ("task", "language", "target_language", "text", "error")
# The turn labels of split-channel transcripts (transcribe.join_segments) are not words the model said.
CHANNEL_LABEL = re.compile(r"^\[channel \d+\] ", re.MULTILINE)


@cache
def _normaliser(language: str):
    # EnglishTextNormalizer reads its 1.7k-entry spelling map from the package once, here.
    return EnglishTextNormalizer() if language == "en" else BasicTextNormalizer()


def normalise(text: str, language: str) -> str:
    """`text` as ASR scoring compares it: Whisper's normaliser for `language`, single spaces,
    and for languages written without spaces, no whitespace at all."""
    words = _normaliser(language)(text).split()
    return "".join(words) if language in UNSPACED_LANGUAGES else " ".join(words)


def asr_metric(language: str) -> str:
    """`cer` for languages written without spaces, else `wer`."""
    return "cer" if language in UNSPACED_LANGUAGES else "wer"


@cache
def _bleu(target_language: str, sentence: bool = False) -> sacrebleu.BLEU:
    # trg_lang picks sacrebleu's own default tokenizer for that language; sentence scores use
    # effective order, as sacrebleu.sentence_bleu does.
    return sacrebleu.BLEU(trg_lang=target_language, effective_order=sentence)


def reference_text(value) -> str | None:
    """A `reference` value as text to score: strings as they are, numbers as written (`42` is
    "42": a manifest's JSON or CSV may type a transcript that is a number), nothing as ""; None for
    values that are no transcript (lists, structs, bytes, booleans), which are counted, not scored."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    return None


def scorable_rows(table: pa.Table) -> tuple[list[dict], Counter]:
    """The rows that can be scored, as dicts with `reference_scored` and `hypothesis_scored`, the
    texts as compared (normalised for ASR, stripped for AST); and the others counted by reason."""
    missing = [name for name in NEEDED_COLUMNS if name not in table.column_names]
    if missing:
        raise ValueError(f"cannot score: the table has no {', '.join(missing)} column")
    columns = ["id", *NEEDED_COLUMNS, "reference"]
    data = {
        name: table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
        for name in columns
    }
    rows, skipped = [], Counter()
    for values in zip(*data.values()):
        row = dict(zip(columns, values))
        row["reference"] = reference_text(row["reference"])
        if row["reference"] is None:
            skipped["reference is not text"] += 1
            continue
        if not row["reference"].strip():
            skipped["no reference"] += 1
            continue
        if row["error"] is not None:
            skipped["failed row"] += 1
            continue
        if row["task"] not in ("asr", "ast") or (row["task"] == "ast" and not row["target_language"]):
            skipped["unknown task or no target language"] += 1
            continue
        if row["task"] == "asr":
            row["reference_scored"] = normalise(row["reference"], row["language"])
            row["hypothesis_scored"] = normalise(CHANNEL_LABEL.sub("", row["text"] or ""), row["language"])
            row["target_language"] = None
        else:
            row["reference_scored"] = row["reference"].strip()
            row["hypothesis_scored"] = CHANNEL_LABEL.sub("", row["text"] or "").strip()
        if not row["reference_scored"]:
            skipped["reference empty after normalisation"] += 1
            continue
        rows.append(row)
    return rows, skipped


def score_asr(rows: list[dict]) -> dict:
    """Corpus WER over the rows of word-spaced languages and CER over the others (None when a
    metric has no rows), with the reference lengths they divide by."""
    by_metric = {"wer": [], "cer": []}
    for row in rows:
        by_metric[asr_metric(row["language"])].append(row)
    result = {"rows": len(rows), "wer": None, "cer": None, "reference_words": 0, "reference_chars": 0}
    if by_metric["wer"]:
        words = jiwer.process_words(
            [r["reference_scored"] for r in by_metric["wer"]], [r["hypothesis_scored"] for r in by_metric["wer"]]
        )
        result["wer"] = words.wer
        result["reference_words"] = words.hits + words.substitutions + words.deletions
    if by_metric["cer"]:
        chars = jiwer.process_characters(
            [r["reference_scored"] for r in by_metric["cer"]], [r["hypothesis_scored"] for r in by_metric["cer"]]
        )
        result["cer"] = chars.cer
        result["reference_chars"] = chars.hits + chars.substitutions + chars.deletions
    return result


def score_ast(rows: list[dict]) -> dict:
    """Corpus BLEU and chrF of translations. Rows with targets that sacrebleu tokenizes differently
    (e.g. `ja` beside `fr`) are each tokenized for their own target, then scored together."""
    hypotheses = [r["hypothesis_scored"] for r in rows]
    references = [r["reference_scored"] for r in rows]
    tokenizers = {t: _bleu(t) for t in sorted({r["target_language"] for r in rows})}
    names = {bleu.tokenizer.signature() for bleu in tokenizers.values()}
    if len(names) == 1:
        bleu = next(iter(tokenizers.values()))
        score = bleu.corpus_score(hypotheses, [references])
        tokenize = names.pop()
    else:

        def tokenized(texts: list[str]) -> list[str]:
            return [tokenizers[r["target_language"]].tokenizer(text) for r, text in zip(rows, texts)]

        bleu = sacrebleu.BLEU(tokenize="none")
        score = bleu.corpus_score(tokenized(hypotheses), [tokenized(references)])
        tokenize = "per target: " + ", ".join(f"{t}={b.tokenizer.signature()}" for t, b in tokenizers.items())
    chrf = sacrebleu.CHRF()
    return {
        "rows": len(rows),
        "bleu": score.score,
        "chrf": chrf.corpus_score(hypotheses, [references]).score,
        "tokenize": tokenize,
        "bleu_signature": str(bleu.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def score_table(table: pa.Table) -> dict:
    """Score every row that has a non-empty `reference` and no `error`.

    Returns row counts (`rows`, `rows_scored`, `rows_skipped`, `skipped_by_reason`), `groups`
    (one per task, language and, for AST, target language), `by_task` (all languages of a task
    pooled) and `overall` (`wer`, `cer`, `bleu`, `chrf` over every scored row they apply to).
    ASR figures are rates in [0, ...) (1.0 = 100%); BLEU and chrF are on sacrebleu's 0-100 scale.
    """
    rows, skipped = scorable_rows(table)
    by_task = {task: [r for r in rows if r["task"] == task] for task in ("asr", "ast")}
    scorers = {"asr": score_asr, "ast": score_ast}

    grouped: dict[tuple, list[dict]] = {}
    for row in rows:
        grouped.setdefault((row["task"], row["language"], row["target_language"]), []).append(row)
    groups = [
        {"task": task, "language": language, "target_language": target, **scorers[task](members)}
        for (task, language, target), members in sorted(grouped.items(), key=lambda kv: [k or "" for k in kv[0]])
    ]
    pooled = {task: scorers[task](members) for task, members in by_task.items() if members}
    overall = {"rows": len(rows), "wer": None, "cer": None, "bleu": None, "chrf": None}
    overall.update({k: v for k, v in pooled.get("asr", {}).items() if k in ("wer", "cer")})
    overall.update({k: v for k, v in pooled.get("ast", {}).items() if k in ("bleu", "chrf")})
    return {
        "rows": table.num_rows,
        "rows_scored": len(rows),
        "rows_skipped": sum(skipped.values()),
        "skipped_by_reason": dict(skipped.most_common()),
        "overall": overall,
        "by_task": pooled,
        "groups": groups,
    }


def score_rows(table: pa.Table) -> pa.Table:
    """One row per scorable row, for reading the worst ones: the texts as compared and that row's
    own `wer` or `cer` (ASR) or sentence `bleu` and `chrf` (AST). Not for aggregates: a mean of
    these is not the corpus figure."""
    rows, _ = scorable_rows(table)
    out = {
        name: []
        for name in (
            "id",
            "task",
            "language",
            "target_language",
            "reference",
            "text",
            "reference_scored",
            "hypothesis_scored",
            "wer",
            "cer",
            "bleu",
            "chrf",
        )
    }
    for row in rows:
        for name in (
            "id",
            "task",
            "language",
            "target_language",
            "reference",
            "text",
            "reference_scored",
            "hypothesis_scored",
        ):
            out[name].append(row[name])
        scores = {"wer": None, "cer": None, "bleu": None, "chrf": None}
        if row["task"] == "asr":
            pair = ([row["reference_scored"]], [row["hypothesis_scored"]])
            metric = asr_metric(row["language"])
            scores[metric] = jiwer.wer(*pair) if metric == "wer" else jiwer.cer(*pair)
        else:
            hypothesis, reference = row["hypothesis_scored"], [row["reference_scored"]]
            bleu = _bleu(row["target_language"], sentence=True)
            scores["bleu"] = bleu.sentence_score(hypothesis, reference).score
            scores["chrf"] = sacrebleu.sentence_chrf(hypothesis, reference).score
        for name, value in scores.items():
            out[name].append(value)
    types = {"wer": pa.float64(), "cer": pa.float64(), "bleu": pa.float64(), "chrf": pa.float64()}
    return pa.table({name: pa.array(values, types.get(name, pa.string())) for name, values in out.items()})


def format_report(report: dict) -> str:
    """The report as a table a person reads: one line per group, then each task pooled."""

    def rate(value):
        return "-" if value is None else f"{value:.1%}"

    def points(value):
        return "-" if value is None else f"{value:.1f}"

    skipped = ", ".join(f"{reason}: {count}" for reason, count in report["skipped_by_reason"].items())
    run = f"run {report['run_id']}: " if report.get("run_id") else ""
    lines = [
        f"{run}{report['rows_scored']} rows scored, "
        f"{report['rows_skipped']} skipped" + (f" ({skipped})" if skipped else ""),
        f"{'task':<5} {'language':<9} {'target':<7} {'rows':>6} {'WER':>8} {'CER':>8} {'BLEU':>7} {'chrF':>7}",
    ]
    entries = [(g["task"], g["language"], g["target_language"] or "-", g) for g in report["groups"]]
    entries += [(task, "(all)", "", pooled) for task, pooled in report["by_task"].items()]
    for task, language, target, g in entries:
        lines.append(
            f"{task:<5} {language:<9} {target:<7} {g['rows']:>6} {rate(g.get('wer')):>8} "
            f"{rate(g.get('cer')):>8} {points(g.get('bleu')):>7} {points(g.get('chrf')):>7}"
        )
    return "\n".join(lines)
