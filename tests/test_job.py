"""The whole job as users run it: `granite-batch run` on a real local Ray with the tiny checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest

from conftest import SAMPLES, run_cli, write_jsonl
from granite_batch.schema import TRANSCRIPT_FIELDS

SAMPLE_ROWS = [json.loads(line) for line in (SAMPLES / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def read_output(root: Path) -> pa.Table:
    return pads.dataset(root / "transcripts", format="parquet", partitioning="hive").to_table()


def only_summary(root: Path) -> dict:
    runs = list((root / "runs").glob("*.json"))
    assert len(runs) == 1
    return json.loads(runs[0].read_text())


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model_dir, format_corpus, broken_corpus):
    """One run over the samples, every format, broken files, bad values and a duplicate."""
    work = tmp_path_factory.mktemp("job")
    rows = [dict(row, audio=str(SAMPLES / row["audio"]), batch="samples") for row in SAMPLE_ROWS]
    rows += [{"audio": str(path), "batch": "formats", "id": f"format-{name}"} for name, path in format_corpus.items()]
    rows += [{"audio": str(path), "batch": "broken", "id": f"broken-{name}"} for name, path in broken_corpus.items()]
    rows += [
        {"audio": str(SAMPLES / "en_weather.flac"), "language": "xx", "id": "bad-language", "batch": "values"},
        {
            "audio": str(SAMPLES / "fr_gare.mp3"),
            "language": "fr",
            "task": "ast",
            "target_language": "de",
            "id": "bad-pair",
            "batch": "values",
        },
        {"audio": str(SAMPLES / "de_bibliothek.ogg"), "id": "format-speech.wav", "batch": "duplicate"},
    ]
    manifest = write_jsonl(work / "manifest.jsonl", rows)
    config = work / "job.yaml"
    config.write_text(f"model: {tiny_model_dir}\nbatch_size: 4\ngeneration:\n  max_new_tokens: 12\n")
    output = work / "out"
    result = run_cli(
        [
            "run",
            "--config",
            str(config),
            "--manifest",
            str(manifest),
            "--output",
            str(output),
            "--batch-size",
            "3",
            "--no-progress",
            "--run-id",
            "test-run",
        ]
    )
    return {"result": result, "output": output, "rows": rows, "work": work}


def test_job_exits_zero_with_failed_rows_and_prints_a_summary(job):
    result = job["result"]
    assert result.returncode == 0, result.stderr[-3000:]
    assert "run test-run:" in result.stdout and "failed" in result.stdout


def test_every_contract_column_with_its_type_and_passthrough(job):
    table = read_output(job["output"])
    for field in TRANSCRIPT_FIELDS:
        assert field.name in table.column_names
        if field.name != "language":  # hive partition values come back dictionary-encoded
            assert table.schema.field(field.name).type == field.type, field.name
    assert {"reference", "speaker", "batch"} <= set(table.column_names)
    assert "keywords" not in table.column_names and "samples" not in table.column_names


def test_exactly_one_row_per_distinct_id(job):
    table = read_output(job["output"])
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(job["rows"]) - 1  # the duplicate id is one unit of work
    duplicate = table.filter(pa.compute.equal(table.column("id"), "format-speech.wav")).to_pylist()[0]
    assert duplicate["batch"] == "formats"  # the first row with that id was processed


def test_partition_folders_per_language_and_few_files(job):
    folders = sorted(p.name for p in (job["output"] / "transcripts").iterdir())
    assert folders == [
        "language=de",
        "language=en",
        "language=es",
        "language=fr",
        "language=ja",
        "language=pt",
        "language=und",
    ]
    for folder in (job["output"] / "transcripts").iterdir():
        files = list(folder.iterdir())
        assert len(files) == 1 and files[0].suffix == ".parquet"
        assert "language" not in pq.read_schema(files[0]).names
    assert not (job["output"] / "_staging" / "test-run").exists()


def test_successful_rows_have_text_segments_and_model(job, tiny_model_dir):
    rows = [r for r in read_output(job["output"]).to_pylist() if r["batch"] in ("samples", "formats")]
    assert len(rows) == 8 + 6
    for row in rows:
        assert row["error"] is None, row
        assert isinstance(row["text"], str)
        assert row["duration_s"] > 2.0
        assert len(row["segments"]) == 1
        segment = row["segments"][0]
        assert segment["start"] == 0.0 and segment["end"] == pytest.approx(row["duration_s"])
        assert segment["text"] == row["text"]
        # The tiny model never stops on its own: the segment ran to its budget, and says so.
        assert segment["truncated"] is True and segment["words"] is None and segment["channel"] is None
        assert row["model"] == str(Path(tiny_model_dir).resolve()) and row["run_id"] == "test-run"
    by_id = {r["id"]: r for r in rows}
    assert by_id["format-speech.flac"]["duration_s"] == pytest.approx(3.4845, abs=0.02)
    assert by_id["format-speech.mp4"]["duration_s"] > 3.4  # AAC priming adds samples; see test_audio.py
    translation = next(r for r in rows if r["task"] == "ast")
    assert translation["language"] == "fr" and translation["target_language"] == "en"


def test_broken_files_and_bad_values_become_error_rows(job):
    rows = {r["id"]: r for r in read_output(job["output"]).to_pylist()}
    expected = {
        "broken-empty.wav": "decode failed: empty file",
        "broken-random.mp3": "decode failed",
        "broken-text.wav": "decode failed",
        "broken-no_audio.mp4": "decode failed: no audio stream",
        "broken-missing.flac": "not found:",
        "bad-language": "unsupported language: 'xx'",
        "bad-pair": "unsupported translation pair: fr -> de",
    }
    for row_id, reason in expected.items():
        row = rows[row_id]
        assert row["error"].startswith(reason), row
        assert row["text"] is None and row["segments"] == []
    assert rows["bad-language"]["language"] == "und"


def test_run_summary(job):
    summary = only_summary(job["output"])
    assert summary["run_id"] == "test-run" and summary["status"] == "succeeded"
    assert summary["rows_in"] == len(job["rows"]) and summary["duplicates"] == 1
    # The duplicate names another recording than the row kept: counted, not only logged.
    assert summary["duplicates_differing"] == 1 and summary["shard_members_skipped"] == {}
    assert summary["rows_ok"] == 14 and summary["rows_failed"] == 7
    assert summary["failures_by_reason"] == {
        "decode failed": 4,
        "not found": 1,
        "unsupported language": 1,
        "unsupported translation pair": 1,
    }
    assert summary["audio_hours"] > 0 and summary["wall_s"] > 0
    # audio_s, wall_s and the factor are each rounded to 1 ms (3 decimals): allow exactly what that moves.
    audio_s, wall_s = summary["audio_s"], summary["wall_s"]
    moved = 5e-4 + (audio_s + 5e-4) / (wall_s - 5e-4) - audio_s / wall_s + 1e-9
    assert abs(summary["rtfx"] - audio_s / wall_s) <= moved
    assert summary["real_time_factor"] == summary["rtfx"]  # the old name, kept while deprecated
    assert summary["config"]["batch_size"] == 3  # the flag overrode the YAML
    assert summary["config"]["generation"]["max_new_tokens"] == 12  # from the YAML
    assert summary["model_revision"] is None and summary["model"].endswith(Path(summary["model"]).name)
    # How the model was fed: 14 one-segment recordings in generate calls of at most 3 segments.
    inference = summary["inference"][summary["model"]]
    assert inference["segments"] == 14 and inference["truncated_segments"] == 14
    assert inference["new_tokens"] == 14 * 12  # every budget hit: max_new_tokens caps the per-second one
    assert inference["generate_calls"] >= 5 and inference["mean_segments_per_call"] <= 3
    assert inference["mean_segments_per_call"] == pytest.approx(14 / inference["generate_calls"], abs=0.01)
    assert 0 <= inference["padding_fraction"] < 1
    assert summary["rows_incomplete"] == 0
    # Quality figures from the rows that carry a reference: the 8 sample rows (7 ASR, 1 AST).
    quality = summary["quality"]
    assert quality["rows_scored"] == 8
    assert quality["overall"]["wer"] > 0.5  # the tiny random model's text is gibberish
    assert quality["by_task"]["ast"]["bleu"] >= 0


def test_bad_manifest_exits_before_any_work_naming_the_line(tmp_path, tiny_model_dir):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"audio": "a.wav"}\n{"audio": "b.wav",}\n', encoding="utf-8")
    result = run_cli(
        ["run", "--manifest", str(manifest), "--output", str(tmp_path / "out"), "--model", str(tiny_model_dir)]
    )
    assert result.returncode == 2
    assert "m.jsonl line 2: malformed JSON" in result.stderr
    assert not (tmp_path / "out").exists()


def test_unloadable_model_exits_before_any_work(tmp_path):
    result = run_cli(
        [
            "run",
            "--manifest",
            str(SAMPLES / "manifest.jsonl"),
            "--output",
            str(tmp_path / "out"),
            "--model",
            str(tmp_path / "no-model-here"),
        ]
    )
    assert result.returncode == 3
    assert "cannot load model" in result.stderr and "--model" in result.stderr
    assert not (tmp_path / "out").exists()


def test_invalid_config_names_the_field(tmp_path):
    config = tmp_path / "job.yaml"
    config.write_text("manifest: m.jsonl\noutput: out\nbatch_size: 0\nlanguage: klingon\n")
    result = run_cli(["run", "--config", str(config)])
    assert result.returncode == 2
    assert "batch_size" in result.stderr and "language" in result.stderr


def test_too_many_failures_exit_non_zero_with_the_summary_written(tmp_path, tiny_model_dir, broken_corpus):
    rows = [
        {"audio": str(broken_corpus["empty.wav"])},
        {"audio": str(broken_corpus["text.wav"])},
        {"audio": str(SAMPLES / "pt_praia.wav"), "language": "pt"},
    ]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    result = run_cli(
        [
            "run",
            "--manifest",
            str(manifest),
            "--output",
            str(tmp_path / "out"),
            "--model",
            str(tiny_model_dir),
            "--max-failed-fraction",
            "0.5",
            "--no-progress",
            "--max-new-tokens",
            "4",
        ]
    )
    assert result.returncode == 5, result.stderr[-2000:]
    assert "2 of 3 rows failed" in result.stderr
    summary = only_summary(tmp_path / "out")
    assert summary["status"] == "too_many_failures" and summary["rows_failed"] == 2
    assert read_output(tmp_path / "out").num_rows == 3


@pytest.mark.parametrize("rows, block_rows", [(1, 1), (48, 3), (300, 16), (2_000_000, 20)])
def test_input_blocks_cover_every_row_once_in_small_blocks_and_few_objects(rows, block_rows):
    from granite_batch.pipeline import MAX_INPUT_BLOCKS, _input_blocks

    table = pa.table({"id": pa.array(range(rows))})
    # 8 CPUs: small manifests are spread two blocks a CPU, larger ones in blocks of 16, and beyond
    # 1.6 M rows the blocks grow so the driver never puts more than MAX_INPUT_BLOCKS objects.
    blocks = _input_blocks(table, {"CPU": 8}, max_rows=16)
    assert pa.concat_tables(blocks).column("id").to_pylist() == list(range(rows))
    assert {b.num_rows for b in blocks[:-1]} <= {block_rows} and blocks[0].num_rows == block_rows
    assert len(blocks) <= MAX_INPUT_BLOCKS
