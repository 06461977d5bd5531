"""Quality scores: hand-computed cases, the libraries called directly, and `granite-batch eval` on an output root."""

from __future__ import annotations

import json
from pathlib import Path

import jiwer
import pyarrow as pa
import pytest
import sacrebleu

from conftest import run_cli
from granite_batch import evaluate, results
from granite_batch.evaluate import score_table
from granite_batch.output.summary import write_summary
from granite_batch.output.writer import TranscriptWriter
from granite_batch.schema import transcript_schema
from granite_batch.storage import OutputRoot


def rows_table(*rows: dict) -> pa.Table:
    """Transcript rows with the contract's columns; unspecified ones get a successful row's values."""
    full = [
        {
            "id": f"row-{i}",
            "audio": f"/a/{i}.wav",
            "language": "en",
            "task": "asr",
            "target_language": None,
            "text": "",
            "segments": [],
            "duration_s": 1.0,
            "error": None,
            "model": "m",
            "model_revision": None,
            "run_id": "r",
            "reference": None,
            **row,
        }
        for i, row in enumerate(rows)
    ]
    schema = transcript_schema(pa.schema([("reference", pa.string())]))
    return pa.Table.from_pylist(full, schema=schema)


def group(report: dict, task: str, language: str, target: str | None = None) -> dict:
    key = (task, language, target)
    found = [g for g in report["groups"] if (g["task"], g["language"], g["target_language"]) == key]
    assert len(found) == 1, report["groups"]
    return found[0]


# --- ASR: normalisation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reference, hypothesis",
    [
        ("The weather, today!", "the weather today"),  # case, punctuation
        ("I have twenty-five apples.", "i have 25 apples"),  # spelled-out numbers
        ("It costs twenty dollars", "it costs $20"),  # currency
        ("My favourite colour", "my favorite color"),  # British / American spelling
        ("It's raining, isn't it?", "it is raining is not it"),  # contractions
        ("uh I think so", "I think so"),  # hesitations
        ("Hello [noise] world (laughs)", "hello world"),  # bracketed annotations
    ],
)
def test_english_normalisation_makes_equivalent_transcripts_score_zero(reference, hypothesis):
    report = score_table(rows_table({"reference": reference, "text": hypothesis}))
    assert report["overall"]["wer"] == 0.0


def test_other_languages_get_the_basic_normaliser_without_english_rules():
    # Case and punctuation still go; "twenty-five" -> "25" is English-only: words
    # "i have twenty five apples" against "i have 25 apples": 1 substitution + 1 deletion over 5.
    table = rows_table(
        {"language": "de", "reference": "I have twenty-five apples.", "text": "i have 25 apples"},
        {"language": "fr", "reference": "Le Train, à l'heure!", "text": "le train à l heure"},
    )
    report = score_table(table)
    assert group(report, "asr", "de")["wer"] == pytest.approx(2 / 5)
    assert group(report, "asr", "fr")["wer"] == 0.0  # apostrophe becomes a space; accents stay


def test_wer_is_corpus_level_not_a_mean_of_rows():
    table = rows_table(
        {"reference": "good morning to you", "text": "good morning to you"},  # 0 errors / 4
        {"reference": "thank you", "text": "thanks"},
    )  # 1 substitution + 1 deletion / 2
    report = score_table(table)
    en = group(report, "asr", "en")
    assert en["wer"] == pytest.approx(2 / 6)  # a mean of row scores would be 0.5
    assert en["reference_words"] == 6 and en["rows"] == 2
    rows = evaluate.score_rows(table).column("wer").to_pylist()
    assert rows == [0.0, 1.0]


def test_wer_matches_jiwer_on_whisper_normalised_text():
    from whisper_normalizer.english import EnglishTextNormalizer

    pairs = [
        ("The cat sat on the mat.", "the cat sat on a mat"),
        ("Twelve o'clock, Mr. Brown!", "12 oclock mister brown"),
        ("She sells sea shells", "she sell seashells"),
        ("Nothing at all", ""),
    ]
    report = score_table(rows_table(*[{"reference": r, "text": h} for r, h in pairs]))
    english = EnglishTextNormalizer()
    expected = jiwer.wer([english(r) for r, _ in pairs], [english(h) for _, h in pairs])
    assert report["overall"]["wer"] == pytest.approx(expected)
    assert 0 < expected < 1


def test_english_normaliser_is_whispers_with_its_spelling_map():
    # The package ships OpenAI's english.json; transformers' copy of Whisper's normaliser needs that map
    # handed in (it comes with a tokenizer download), so the two must agree when given the same one.
    import importlib.resources

    from transformers.models.whisper.english_normalizer import EnglishTextNormalizer as TransformersNormalizer
    from whisper_normalizer.english import EnglishTextNormalizer

    mapping = json.loads(
        importlib.resources.files("whisper_normalizer").joinpath("normalizers/english.json").read_text(encoding="utf-8")
    )
    assert len(mapping) > 1000 and mapping["colour"] == "color"
    ours, theirs = EnglishTextNormalizer(), TransformersNormalizer(mapping)
    for text in [
        "It's 3:30 p.m., Mr. O'Neil's favourite $5.50 sandwich!",
        "twenty-one thousand and five",
        "Dr. Smith can't, won't; they'd've gone",
        "the 1st of January, 1990s, 10%",
        "uh, hmm [Music]",
    ]:
        assert ours(text) == theirs(text)


def test_japanese_is_scored_by_characters_ignoring_spaces_and_punctuation():
    # 今日はとても良い天気です (12 characters) against 今日はとてもいい天気です: 良 -> い, one substitution.
    report = score_table(
        rows_table({"language": "ja", "reference": "今日はとても良い天気です。", "text": "今日は とても いい天気です"})
    )
    ja = group(report, "asr", "ja")
    assert ja["cer"] == pytest.approx(1 / 12) and ja["wer"] is None and ja["reference_chars"] == 12
    assert report["overall"] == {"rows": 1, "wer": None, "cer": pytest.approx(1 / 12), "bleu": None, "chrf": None}


def test_pooled_asr_keeps_wer_and_cer_apart():
    table = rows_table(
        {"language": "en", "reference": "the cat sat down", "text": "the cat sat"},
        {"language": "es", "reference": "uno dos", "text": "uno dos"},
        {"language": "ja", "reference": "天気", "text": "電気"},
    )
    asr = score_table(table)["by_task"]["asr"]
    assert asr["wer"] == pytest.approx(1 / 6)  # en + es words only
    assert asr["cer"] == pytest.approx(1 / 2)  # ja characters only
    assert asr["rows"] == 3


# --- AST: BLEU and chrF ---------------------------------------------------------------------------

TRANSLATIONS = [
    ("The train to Lyon leaves the station at eight o'clock.", "The train for Lyon leaves the station at eight."),
    ("The library is closed on Sunday.", "The library is closed on Sundays."),
    ("We are going to the beach at the weekend.", "We go to the beach on the weekend."),
]


def ast_rows(pairs, language="fr", target="en"):
    return [
        {"task": "ast", "language": language, "target_language": target, "reference": r, "text": h} for r, h in pairs
    ]


def test_bleu_and_chrf_equal_sacrebleus_corpus_scores():
    report = score_table(rows_table(*ast_rows(TRANSLATIONS)))
    hypotheses, references = [h for _, h in TRANSLATIONS], [[r for r, _ in TRANSLATIONS]]
    fr_en = group(report, "ast", "fr", "en")
    assert fr_en["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, references).score)
    assert fr_en["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hypotheses, references).score)
    assert fr_en["tokenize"] == "13a" and 0 < fr_en["bleu"] < 100
    # Corpus BLEU is not the mean of sentence BLEUs.
    mean = sum(sacrebleu.sentence_bleu(h, [r]).score for r, h in TRANSLATIONS) / len(TRANSLATIONS)
    assert fr_en["bleu"] != pytest.approx(mean)


def test_exact_translations_score_100_and_unrelated_ones_near_0():
    exact = score_table(rows_table(*ast_rows([(r, r) for r, _ in TRANSLATIONS])))["overall"]
    assert exact["bleu"] == pytest.approx(100.0) and exact["chrf"] == pytest.approx(100.0)
    unrelated = score_table(rows_table(*ast_rows([(r, "zzz qqq") for r, _ in TRANSLATIONS])))["overall"]
    assert unrelated["bleu"] == pytest.approx(0.0) and unrelated["chrf"] < 5


def test_japanese_targets_are_tokenized_with_mecab():
    pairs = [("今日はとても良い天気です。", "今日はとてもいい天気です。"), ("駅は近いです。", "駅は近いです。")]
    ja = group(score_table(rows_table(*ast_rows(pairs, "en", "ja"))), "ast", "en", "ja")
    hypotheses, references = [h for _, h in pairs], [[r for r, _ in pairs]]
    assert ja["tokenize"].startswith("ja-mecab")
    assert ja["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hypotheses, references, tokenize="ja-mecab").score)
    # Without word segmentation a whole Japanese sentence is one token, and the near miss scores less.
    assert ja["bleu"] > sacrebleu.corpus_bleu(hypotheses, references, tokenize="13a").score


def test_chinese_targets_use_sacrebleus_zh_tokenizer():
    pairs = [("今天天气很好。", "今天天气非常好。")]
    zh = group(score_table(rows_table(*ast_rows(pairs, "en", "zh"))), "ast", "en", "zh")
    assert zh["tokenize"] == "zh"
    expected = sacrebleu.corpus_bleu(["今天天气非常好。"], [["今天天气很好。"]], tokenize="zh").score
    assert zh["bleu"] == pytest.approx(expected)


def test_pooling_targets_with_different_tokenizers_tokenizes_each_for_its_own():
    english, japanese = TRANSLATIONS[0][0], "今日はとても良い天気です。"
    near = score_table(
        rows_table(
            *ast_rows(TRANSLATIONS[:1], "fr", "en"), *ast_rows([(japanese, "今日はとてもいい天気です。")], "en", "ja")
        )
    )["by_task"]["ast"]
    assert "ja=ja-mecab" in near["tokenize"] and "en=13a" in near["tokenize"]
    assert 0 < near["bleu"] < 100
    exact = score_table(
        rows_table(*ast_rows([(english, english)], "fr", "en"), *ast_rows([(japanese, japanese)], "en", "ja"))
    )["by_task"]["ast"]
    assert exact["bleu"] == pytest.approx(100.0)


# --- which rows are scored ------------------------------------------------------------------------


def test_rows_without_reference_failed_or_empty_after_normalisation_are_counted_not_scored():
    table = rows_table(
        {"reference": "hello world", "text": "hello world"},
        {"reference": None, "text": "no reference"},
        {"reference": "   ", "text": "blank reference"},
        {"reference": "hello", "text": None, "error": "decode failed: no audio stream"},
        {"reference": "[noise]", "text": "only an annotation"},
        {"reference": "hello there", "text": None},  # no text but no error: all deletions
        {"task": "ast", "target_language": None, "reference": "hi", "text": "hi"},
    )
    report = score_table(table)
    assert (report["rows"], report["rows_scored"], report["rows_skipped"]) == (7, 2, 5)
    assert report["skipped_by_reason"] == {
        "no reference": 2,
        "failed row": 1,
        "reference empty after normalisation": 1,
        "unknown task or no target language": 1,
    }
    assert report["overall"]["wer"] == pytest.approx(2 / 4)


def test_a_table_without_reference_column_scores_nothing():
    table = rows_table({"text": "x"}).drop_columns(["reference"])
    report = score_table(table)
    assert report["rows_scored"] == 0 and report["skipped_by_reason"] == {"no reference": 1}
    assert report["groups"] == [] and report["overall"]["wer"] is None


def test_a_table_without_the_needed_columns_is_refused():
    with pytest.raises(ValueError, match="no task"):
        score_table(pa.table({"text": ["x"], "reference": ["x"]}))


# --- an output root: results.load and granite-batch eval ----------------------------------------


def write_run(root: Path, run_id: str, started_at: str, rows: list[dict], passthrough: pa.Schema) -> None:
    """A run as the job leaves it: transcript files through the job's writer, and its summary."""
    table = rows_table(*[dict(row, run_id=run_id) for row in rows])
    extra = [pa.array([row.get(f.name) for row in rows], f.type) for f in passthrough if f.name != "reference"]
    for f, column in zip([f for f in passthrough if f.name != "reference"], extra):
        table = table.append_column(f, column)
    writer = TranscriptWriter(OutputRoot(str(root)), run_id, transcript_schema(passthrough))
    writer.write(table)
    writer.close()
    write_summary(
        OutputRoot(str(root)),
        run_id,
        {
            "run_id": run_id,
            "status": "succeeded",
            "started_at": started_at,
            "rows_ok": len(rows),
            "rows_failed": 0,
            "wall_s": 1.0,
        },
    )


@pytest.fixture
def output_root(tmp_path) -> Path:
    root = tmp_path / "out"
    write_run(
        root,
        "run-1",
        "2026-01-01T00:00:00+00:00",
        [
            {"id": "a", "language": "en", "reference": "Hello world.", "text": "hello world", "speaker": "s1"},
            {"id": "b", "language": "fr", "reference": "Bonjour le monde", "text": "bonjour monde", "speaker": "s2"},
        ],
        pa.schema([("reference", pa.string()), ("speaker", pa.string())]),
    )
    write_run(
        root,
        "run-2",
        "2026-01-02T00:00:00+00:00",
        [
            {"id": "c", "language": "en", "reference": "Good night moon", "text": "good light"},
            {
                "id": "d",
                "language": "fr",
                "task": "ast",
                "target_language": "en",
                "reference": "Good night",
                "text": "Good night",
            },
            {"id": "e", "language": "de", "text": None, "error": "not found: /a/e.wav", "reference": "Gute Nacht"},
        ],
        pa.schema([("reference", pa.string())]),
    )
    return root


def test_load_restores_language_unifies_runs_and_filters(output_root):
    table = results.load(str(output_root))
    assert table.num_rows == 5
    assert table.schema.field("language").type == pa.string()
    assert table.column_names[: len(transcript_schema())] == [f.name for f in transcript_schema()]
    speakers = dict(zip(table.column("id").to_pylist(), table.column("speaker").to_pylist()))
    assert speakers == {"a": "s1", "b": "s2", "c": None, "d": None, "e": None}  # only run-1 had the column
    assert sorted(results.load(str(output_root), language="fr").column("id").to_pylist()) == ["b", "d"]
    assert results.load(str(output_root), language=["en", "de"], run_id="run-2").column("id").to_pylist() in (
        ["c", "e"],
        ["e", "c"],
    )
    assert results.load(str(output_root), task="ast").column("id").to_pylist() == ["d"]
    assert [run["run_id"] for run in results.runs(output_root)] == ["run-1", "run-2"]  # a Path works too
    assert results.load(output_root / "nothing").num_rows == 0


def test_eval_cli_scores_the_newest_run_and_writes_its_report(output_root):
    result = run_cli(["eval", str(output_root)])
    assert result.returncode == 0, result.stderr
    report = json.loads((output_root / "eval" / "run-2.json").read_text())
    assert report["run_id"] == "run-2"
    assert (report["rows"], report["rows_scored"], report["skipped_by_reason"]) == (3, 2, {"failed row": 1})
    # "good night moon" against "good light": 1 substitution + 1 deletion over 3 words.
    assert group(report, "asr", "en")["wer"] == pytest.approx(2 / 3)
    assert group(report, "ast", "fr", "en")["chrf"] == pytest.approx(100.0)
    assert "WER" in result.stdout and "66.7%" in result.stdout and "eval/run-2.json" in result.stdout


def test_eval_cli_scores_a_named_run_or_all_rows_with_filters(output_root):
    assert run_cli(["eval", str(output_root), "--run", "run-1"]).returncode == 0
    run_1 = json.loads((output_root / "eval" / "run-1.json").read_text())
    assert run_1["rows_scored"] == 2 and group(run_1, "asr", "en")["wer"] == 0.0
    assert group(run_1, "asr", "fr")["wer"] == pytest.approx(1 / 3)

    assert run_cli(["eval", str(output_root), "--run", "all", "--language", "en", "--task", "asr"]).returncode == 0
    everything = json.loads((output_root / "eval" / "all.language=en.task=asr.json").read_text())
    assert everything["filters"] == {"language": "en", "task": "asr"}
    assert everything["rows_scored"] == 2  # "a" from run-1, "c" from run-2
    assert everything["overall"]["wer"] == pytest.approx(2 / 5)

    unknown = run_cli(["eval", str(output_root), "--run", "no-such-run"])
    assert unknown.returncode == 2 and "no run no-such-run" in unknown.stderr


@pytest.mark.parametrize("language", ["../../../escaped", "en/../../x", "/tmp/x", "en\\..\\x", ""])
def test_eval_refuses_a_path_like_language_and_writes_nothing_outside_the_root(output_root, language):
    before = set(output_root.parent.rglob("*"))
    result = run_cli(["eval", str(output_root), "--run", "all", "--language", language])
    assert result.returncode == 2, result.stderr
    assert "language" in result.stderr and "Traceback" not in result.stderr
    assert {p for p in set(output_root.parent.rglob("*")) - before if output_root not in p.parents} == set()


def test_json_documents_are_never_written_outside_their_root(tmp_path):
    from granite_batch.storage import write_json

    for relative in ("../x.json", "eval/../../x.json", "/x.json", "eval//x.json", "eval/a\\..\\..\\x.json"):
        with pytest.raises(ValueError, match="would not lie inside"):
            write_json(OutputRoot(str(tmp_path / "out")), relative, {})
    assert not (tmp_path / "x.json").exists()
