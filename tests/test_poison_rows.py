"""Poison rows and hostile inputs, round 2: one bad row never stops a job, nothing committed is lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from conftest import REPO, SAMPLES, run_cli, write_jsonl
from granite_batch.evaluate import score_table
from granite_batch.storage import OutputRoot


def transcripts(references: pa.Array) -> pa.Table:
    n = len(references)
    return pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "language": ["en"] * n,
            "task": ["asr"] * n,
            "target_language": pa.nulls(n, pa.string()),
            "text": ["forty two"] * n,
            "error": pa.nulls(n, pa.string()),
            "reference": references,
        }
    )


def test_numeric_references_are_scored_as_written_and_others_are_counted():
    numbers = score_table(transcripts(pa.array([42, 7])))
    assert numbers["rows_scored"] == 2 and numbers["overall"]["wer"] is not None
    # English normalisation spells both sides alike: "forty two" against 42 is no error.
    assert score_table(transcripts(pa.array([42])))["overall"]["wer"] == 0.0
    odd = score_table(transcripts(pa.array([[1, 2], None, []], pa.list_(pa.int64()))))
    assert odd["rows_scored"] == 0
    assert odd["skipped_by_reason"] == {"reference is not text": 2, "no reference": 1}
    assert score_table(transcripts(pa.array([True])))["skipped_by_reason"] == {"reference is not text": 1}


def test_an_output_that_is_a_file_is_refused(tmp_path, s3, s3_server):
    from granite_batch.config import ConfigError
    from granite_batch.run.preflight import check_output_root

    (tmp_path / "out.txt").write_text("not a folder")
    with pytest.raises(ConfigError, match=r"output .*out.txt is a file, not a folder"):
        check_output_root(OutputRoot(str(tmp_path / "out.txt")))
    check_output_root(OutputRoot(str(tmp_path / "new")))  # not there yet: fine
    (tmp_path / "root").mkdir()
    check_output_root(OutputRoot(str(tmp_path / "root")))
    s3.mkdir("pre")
    s3.pipe("pre/object", b"x")
    options = {"s3": {"endpoint_url": s3_server}}
    with pytest.raises(ConfigError, match="is a file"):
        check_output_root(OutputRoot("s3://pre/object", options))
    s3.pipe("pre/root/runs/a.json", b"{}")
    check_output_root(OutputRoot("s3://pre/root", options))


@pytest.mark.parametrize(
    "existing", ["transcripts/language=en/part-R1-00001.parquet", "_staging/R1/language=en/part-R1-00001.parquet"]
)
def test_a_run_id_already_in_the_output_is_refused(tmp_path, existing):
    from granite_batch.config import ConfigError
    from granite_batch.run.preflight import check_run_id_unused

    check_run_id_unused(OutputRoot(str(tmp_path)), "R1")  # an empty root
    (tmp_path / "transcripts" / "language=en").mkdir(parents=True)
    (tmp_path / "transcripts" / "language=en" / "part-R10-00001.parquet").write_text("")  # another run's
    check_run_id_unused(OutputRoot(str(tmp_path)), "R1")
    (tmp_path / existing).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / existing).write_text("")
    with pytest.raises(ConfigError, match=r"run id R1 already exists in .* a new run needs a new --run-id"):
        check_run_id_unused(OutputRoot(str(tmp_path)), "R1")
    check_run_id_unused(OutputRoot(str(tmp_path)), "R2")


def test_fifos_and_devices_are_named_for_what_they_are_without_blocking(tmp_path):
    import os

    from granite_batch.audio.decode import DecodeError, load_recording

    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)  # opening it for reading would wait for a writer forever
    for uri, kind in [(str(fifo), "fifo"), (f"file://{fifo}", "fifo"), ("/dev/null", "character device")]:
        with pytest.raises(DecodeError) as caught:
            load_recording(uri)
        assert str(caught.value) == f"not a regular file: {uri} is a {kind}"


def test_a_config_file_that_is_not_text_is_refused_by_name(tmp_path):
    from conftest import run_cli

    config = tmp_path / "job.yaml"
    config.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    result = run_cli(["run", "--config", str(config), "--manifest", "m.jsonl", "--output", str(tmp_path / "out")])
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"granite-batch: config file {config} is not text: byte 0x89 at offset 0 is not UTF-8 (give a YAML file)"
    )


def test_rows_lost_with_their_batch_become_error_rows_in_the_output_schema():
    from granite_batch.run.recovery import CRASH_REASON, crashed_rows
    from granite_batch.schema import conform, transcript_schema

    todo = pa.table(
        {
            "id": ["a", "b", "c", "d"],
            "audio": ["/a", "/b", "/c", "/d"],
            "language": ["en"] * 4,
            "task": ["asr"] * 4,
            "target_language": pa.nulls(4, pa.string()),
            "keywords": pa.nulls(4, pa.list_(pa.string())),
            "error": [None, None, "unsupported language: 'xx'", None],
            "speaker": ["s1", "s2", "s3", "s4"],
        }
    )
    lost = todo.slice(1, 2)  # rows b and c never came back
    schema = transcript_schema(todo.schema)
    rows = crashed_rows(lost, schema, "m", None, "R1")
    assert rows.schema == schema and conform(rows, schema) == rows
    assert rows.column("error").to_pylist() == [CRASH_REASON, "unsupported language: 'xx'"]
    assert rows.column("speaker").to_pylist() == ["s2", "s3"] and rows.column("text").null_count == 2
    assert rows.column("segments").to_pylist() == [[], []]


# --- the job, end to end (tiny checkpoint, real Ray) ----------------------------------------------


def run_job(tmp_path, tiny_model_dir, rows, config: str = "", extra: list[str] = (), dry: bool = False):
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    (tmp_path / "job.yaml").write_text(config or "{}\n")
    command = [
        "run",
        "--config",
        str(tmp_path / "job.yaml"),
        "--manifest",
        str(manifest),
        "--output",
        str(tmp_path / "out"),
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "6",
        "--no-progress",
        *extra,
    ]
    return command, None if dry else run_cli(command)


def output_rows(tmp_path) -> dict:
    table = pads.dataset(tmp_path / "out" / "transcripts", format="parquet", partitioning="hive").to_table()
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)), "an id has two rows"
    return {row["id"]: row for row in table.to_pylist()}


def summaries(tmp_path) -> list[dict]:
    return [json.loads(path.read_text()) for path in sorted((tmp_path / "out" / "runs").glob("*.json"))]


CRASH_ROWS = [
    {"id": "en", "audio": str(SAMPLES / "en_weather.flac")},
    {"id": "fr", "audio": str(SAMPLES / "fr_gare.mp3"), "language": "fr"},
    {"id": "de", "audio": str(SAMPLES / "de_bibliothek.ogg"), "language": "de"},
    {"id": "pt", "audio": str(SAMPLES / "pt_praia.wav"), "language": "pt"},
]
CRASH_REASONS = {
    "decode": "decode crashed the worker: signal 11 (SIGSEGV)",
    "segment": "segment crashed the worker: signal 11 (SIGSEGV)",
    "model": "model crashed the worker: the model actor died on this row, also alone (see the worker logs)",
}


def test_rows_that_kill_their_workers_become_one_error_row_each_and_the_job_goes_on(tmp_path, tiny_model_dir):
    # One chosen row per stage kills the process working on it (SIGSEGV, as a native crash would).
    chosen = {"decode": CRASH_ROWS[1]["audio"], "segment": CRASH_ROWS[2]["audio"], "model": CRASH_ROWS[3]["audio"]}
    command, _ = run_job(tmp_path, tiny_model_dir, CRASH_ROWS, "decode_batch_size: 2\nbatch_size: 4\n", dry=True)
    # The hook is a test's argument to run_job, never part of the user's config: a driver of the test's own.
    driver = (
        "import json, sys\n"
        "from granite_batch.audio.isolation import CrashTest\n"
        "from granite_batch.config import load_config\n"
        "from granite_batch.run.transcription import run_job\n"
        "overrides = {'manifest': sys.argv[2], 'output': sys.argv[3], 'model': sys.argv[4],\n"
        "             'generation': {'max_new_tokens': 6}}\n"
        "crash_test = CrashTest(**json.loads(sys.argv[5]))\n"
        "run_job(load_config(sys.argv[1], overrides), progress=False, crash_test=crash_test)\n"
    )
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            driver,
            str(tmp_path / "job.yaml"),
            str(tmp_path / "m.jsonl"),
            str(tmp_path / "out"),
            str(tiny_model_dir),
            json.dumps(chosen),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = output_rows(tmp_path)
    assert sorted(rows) == ["de", "en", "fr", "pt"]
    for row_id, stage in (("fr", "decode"), ("de", "segment"), ("pt", "model")):
        assert rows[row_id]["error"] == CRASH_REASONS[stage] and rows[row_id]["text"] is None
    assert rows["en"]["error"] is None and rows["en"]["text"], rows["en"]
    summary = summaries(tmp_path)[0]
    assert summary["status"] == "succeeded" and summary["rows_failed"] == 3
    assert summary["rows_redone_alone"] >= 1  # the model's lost batch, each of its rows alone
    again = run_cli(command)  # the same command again: nothing left to do, nothing doubled
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(output_rows(tmp_path)) == 4
    assert summaries(tmp_path)[-1]["status"] == "succeeded"


def eight_channel_wav(path):
    subprocess.run(
        ["ffmpeg", "-v", "error", "-f", "lavfi", "-i", "sine=d=1:sample_rate=16000", "-ac", "8", str(path)], check=True
    )
    return path


@pytest.mark.slow
def test_hostile_rows_round_two_each_give_one_row_and_a_second_run_completes(tmp_path, tiny_model_dir):
    fifo = tmp_path / "pipe.wav"
    os.mkfifo(fifo)
    long_id = "x" * 5000
    keywords = [f"name{i}" for i in range(3000)]  # far more than 4096 positions of prompt
    rows = [
        {"id": "ch8", "audio": str(eight_channel_wav(tmp_path / "ch8.wav"))},
        {"id": long_id, "audio": str(SAMPLES / "en_weather.flac")},
        {"id": "numeric-reference", "audio": str(SAMPLES / "en_weather.flac"), "reference": 42},
        {"id": "fifo", "audio": str(fifo)},
        {"id": "device", "audio": "/dev/null"},
        {"id": "keywords", "audio": str(SAMPLES / "en_weather.flac"), "keywords": keywords},
    ]
    command, result = run_job(tmp_path, tiny_model_dir, rows, "subtitles: [srt, vtt]\n")
    assert result.returncode == 0, result.stderr[-3000:]
    out = output_rows(tmp_path)
    assert sorted(out) == sorted(row["id"] for row in rows)
    assert out["ch8"]["error"] is None and out["ch8"]["duration_s"] == pytest.approx(1.0)
    assert out[long_id]["error"] is None
    names = [path.name for path in (tmp_path / "out" / "subtitles" / "srt").iterdir()]
    assert any(name.startswith("x" * 200) and len(name.encode()) <= 255 for name in names), names
    assert out["numeric-reference"]["error"] is None
    assert out["fifo"]["error"] == f"not a regular file: {fifo} is a fifo"
    assert out["device"]["error"] == "not a regular file: /dev/null is a character device"
    assert out["keywords"]["error"] is None
    summary = summaries(tmp_path)[0]
    assert summary["status"] == "succeeded"
    assert summary["quality"]["rows_scored"] == 1  # the reference 42, scored as "42"
    assert summary["keywords_dropped"]["rows"] == 1 and 0 < summary["keywords_dropped"]["keywords"] < 3000

    again = run_cli(command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert len(output_rows(tmp_path)) == len(rows)
    assert summaries(tmp_path)[-1]["status"] == "succeeded"
    # The first run's id again: refused before any work, its rows and summary untouched.
    first = summary["run_id"]
    reused = run_cli(command + ["--run-id", first])
    assert reused.returncode == 2
    assert f"run id {first} already exists in" in reused.stderr.replace(repr(first), first)
    assert summaries(tmp_path)[0] == summary and len(output_rows(tmp_path)) == len(rows)


def test_a_run_id_that_names_files_in_the_output_is_refused_before_any_work(tmp_path, tiny_model_dir):
    part = tmp_path / "out" / "transcripts" / "language=en" / "part-R1-00001.parquet"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"")  # e.g. a run whose summary was deleted
    command, result = run_job(tmp_path, tiny_model_dir, CRASH_ROWS[:1], extra=["--run-id", "R1"])
    assert result.returncode == 2
    assert "run id R1 already exists in" in result.stderr and "a new run needs a new --run-id" in result.stderr
    assert not (tmp_path / "out" / "runs").exists()


def test_an_output_that_is_a_file_is_refused_before_any_work(tmp_path, tiny_model_dir):
    (tmp_path / "out").write_text("a file where the output root should be")
    _, result = run_job(tmp_path, tiny_model_dir, CRASH_ROWS[:1])
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"granite-batch: output {tmp_path / 'out'} is a file, not a folder: "
        "--output names the dataset root (a folder or prefix)"
    )


def test_a_run_that_fails_after_it_started_ends_its_summary_with_failed(tmp_path, tiny_model_dir):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "subtitles").write_text("in the way of the subtitles folder")
    command, result = run_job(tmp_path, tiny_model_dir, CRASH_ROWS[:1], "subtitles: [srt]\n")
    assert result.returncode == 4
    summary = summaries(tmp_path)[0]
    assert summary["status"] == "failed" and summary["finished_at"]
    assert summary["error"].split(":")[0] in ("FileExistsError", "NotADirectoryError"), summary["error"]
    assert "\n" not in summary["error"]
    (tmp_path / "out" / "subtitles").unlink()
    again = run_cli(command)
    assert again.returncode == 0, again.stderr[-3000:]
    assert summaries(tmp_path)[-1]["status"] == "succeeded" and len(output_rows(tmp_path)) == 1
