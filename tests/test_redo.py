"""Re-transcription by selection: the committed rows a selection holds for are planned again, and each
new row takes its old row's place, so every id has exactly one row at every step (and after a crash)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from conftest import REPO, SAMPLES, run_cli, write_jsonl
from granite_batch.inputs.manifest import ManifestStream
from granite_batch.inputs.plan import plan_counts, prepare_plan
from granite_batch.inputs.redo import SelectionError, parse_selection, parse_selections, selected
from granite_batch.inputs.rows import Defaults
from granite_batch.output.committed import drop_failed_rows
from granite_batch.output.replace import Replacements
from granite_batch.output.writer import TranscriptWriter
from granite_batch.schema import SEGMENT_TYPE, transcript_schema
from granite_batch.storage import OutputRoot, filesystem

OLD, NEW = "ibm-granite/granite-4.0-1b-speech", "ibm-granite/granite-speech-4.1-2b"


def rows(ids: list[str], model: str, run_id: str, language: str = "en", logprob: float = -0.1) -> pa.Table:
    n = len(ids)
    segments = [[{"start": 0.0, "end": 1.0, "text": f"{model} {i}", "avg_logprob": logprob}] for i in ids]
    return pa.table(
        {
            "id": ids,
            "audio": [f"/audio/{i}.wav" for i in ids],
            "language": [language] * n,
            "task": ["asr"] * n,
            "text": [f"{model} {i}" for i in ids],
            "segments": pa.array(segments, pa.list_(SEGMENT_TYPE)),
            "duration_s": [1.0] * n,
            "model": [model] * n,
            "run_id": [run_id] * n,
        }
    )


def commit(output: str, table: pa.Table, run_id: str, options=None, **writer) -> list[str]:
    out = TranscriptWriter(OutputRoot(output, options), run_id, transcript_schema(), **writer)
    out.write(table)
    return out.close()


def committed(output: str, options=None) -> pa.Table:
    fs, root = filesystem(output, options)
    return pads.dataset(f"{root}/transcripts", filesystem=fs, format="parquet", partitioning="hive").to_table()


def manifest(tmp_path: Path, ids: list[str]) -> ManifestStream:
    path = write_jsonl(tmp_path / "m.jsonl", [{"id": i, "audio": f"/audio/{i}.wav"} for i in ids])
    return ManifestStream(str(path), Defaults())


def test_selections_read_top_level_and_segment_columns():
    table = rows(["a", "b"], OLD, "20250101T000000Z-1", logprob=-2.0).append_column(
        "model_revision", pa.array(["r1", None])
    )
    table = pa.concat_tables(
        [table, rows(["c"], NEW, "20270101T000000Z-2").append_column("model_revision", pa.array(["r2"]))]
    )
    chosen = selected(
        parse_selections(
            [f"model == '{OLD}' and model_revision is null", "run_id < 2026", "segments.avg_logprob < -1"]
        ),
        table,
    )
    assert chosen.to_pylist() == [1, 0, None]  # counted under the first selection that holds
    assert selected(parse_selections(["flagged == true"]), table).to_pylist() == [None] * 3  # absent column
    for bad in ("model ~ x", "segments.nope < 1", "duration_s < soon"):
        with pytest.raises(SelectionError):
            selected([parse_selection(bad)], table)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_redo_plans_the_selected_ids_and_replaces_each_row_in_place(tmp_path, where, request):
    options = None
    output = str(tmp_path / "out")
    if where == "s3":
        endpoint = request.getfixturevalue("s3_server")
        request.getfixturevalue("s3").mkdir("redo-plan")
        options = {"s3": {"endpoint_url": endpoint}}
        output = "s3://redo-plan/out"
    commit(output, rows(["a", "b", "c"], OLD, "r1"), "r1", options)
    commit(output, rows(["d", "e"], NEW, "r2", language="fr"), "r2", options)
    stream = manifest(tmp_path, ["a", "b", "c", "d", "e", "f"])
    stream.storage_options = options
    replacements = Replacements()
    layout = prepare_plan(
        stream,
        OutputRoot(output, options),
        str(tmp_path / "plan"),
        redo=parse_selections([f"model == {OLD}"]),
        replacements=replacements,
    )
    counts = plan_counts(layout)
    assert counts["rows_to_do"] == 4 and counts["rows_redone"] == 3 and counts["rows_already_done"] == 2
    assert layout.committed.rows_selected == [3] and len(replacements) == 3

    # The new rows of a, b (and one new id, f) arrive in one file: a and b take their old rows' place.
    seen: list[list[str]] = []

    def reader_looks():  # before every step that changes the output, each id has exactly one row
        ids = committed(output, options).column("id").to_pylist()
        seen.append(ids)
        assert sorted(ids) == sorted(set(ids))

    out = TranscriptWriter(
        OutputRoot(output, options), "r3", transcript_schema(), before_commit=reader_looks, replacements=replacements
    )
    out.write(rows(["a", "b", "f"], NEW, "r3"))
    out.close()
    table = committed(output, options)
    assert sorted(table.column("id").to_pylist()) == ["a", "b", "c", "d", "e", "f"]
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert [by_id[i]["model"] for i in "abcdef"] == [NEW, NEW, OLD, NEW, NEW, NEW]
    assert replacements.rows_replaced == 2 and replacements.rows_moved == 0 and seen


def test_a_crash_between_replacements_leaves_one_row_per_id_and_the_rest_selected(tmp_path):
    output = str(tmp_path / "out")
    commit(output, rows(["a", "b"], OLD, "r1"), "r1")
    commit(output, rows(["c", "d"], OLD, "r2"), "r2")
    selections = parse_selections([f"model == {OLD}"])
    replacements = Replacements()
    prepare_plan(
        manifest(tmp_path, list("abcd")),
        OutputRoot(output),
        str(tmp_path / "p1"),
        redo=selections,
        replacements=replacements,
    )

    calls = []

    def crash_on_second_file():
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed")

    out = TranscriptWriter(
        OutputRoot(output), "r3", transcript_schema(), before_commit=crash_on_second_file, replacements=replacements
    )
    out.write(rows(list("abcd"), NEW, "r3"))
    with pytest.raises(RuntimeError, match="killed"):
        out.close()
    table = committed(output)
    ids = table.column("id").to_pylist()
    assert sorted(ids) == list("abcd")  # one row each: two replaced, two still old
    models = dict(zip(ids, table.column("model").to_pylist()))
    assert sorted(models.values()) == sorted([NEW, NEW, OLD, OLD])

    again = prepare_plan(manifest(tmp_path, list("abcd")), OutputRoot(output), str(tmp_path / "p2"), redo=selections)
    assert plan_counts(again)["rows_redone"] == 2  # the re-run redoes only the rows still old


def test_a_new_row_in_another_partition_moves_there(tmp_path):
    output = str(tmp_path / "out")
    commit(output, rows(["a", "b"], OLD, "r1"), "r1")
    replacements = Replacements()
    prepare_plan(
        manifest(tmp_path, ["a"]),
        OutputRoot(output),
        str(tmp_path / "p"),
        redo=parse_selections(["id == a"]),
        replacements=replacements,
    )
    commit(output, rows(["a"], NEW, "r2", language="fr"), "r2", replacements=replacements)
    table = committed(output)
    assert sorted(zip(table.column("id").to_pylist(), table.column("language").to_pylist())) == [
        ("a", "fr"),
        ("b", "en"),
    ]
    assert replacements.rows_moved == 1


def test_redo_with_retry_failed_when_the_old_file_is_gone(tmp_path):
    output = str(tmp_path / "out")
    failed = rows(["a"], OLD, "r1").append_column("error", pa.array(["decode failed: no audio stream"]))
    commit(output, failed, "r1")
    replacements = Replacements()
    layout = prepare_plan(
        manifest(tmp_path, ["a"]),
        OutputRoot(output),
        str(tmp_path / "p"),
        retry_failed=True,
        redo=parse_selections([f"model == {OLD}"]),
        replacements=replacements,
    )
    assert plan_counts(layout)["rows_to_do"] == 1
    drop_failed_rows(OutputRoot(output), layout.committed.failed_files)  # the file held only the failed row: removed
    commit(output, rows(["a"], NEW, "r2"), "r2", replacements=replacements)
    table = committed(output)
    assert table.column("id").to_pylist() == ["a"] and table.column("model").to_pylist() == [NEW]


@pytest.mark.slow  # two CLI runs and two models: ~3 min on 2 busy cores
def test_upgrade_rerun_replaces_exactly_the_selected_rows(tmp_path, tiny_model_dir, tiny_ctc_dir):
    """Run with model A, then redo A's rows with model B: the same ids, each once, now B's."""
    recordings = [("en_weather.flac", "en"), ("fr_gare.mp3", "fr"), ("pt_praia.wav", "pt")]
    entries = [{"audio": str(SAMPLES / name), "language": lang, "id": name} for name, lang in recordings]
    first_manifest = write_jsonl(tmp_path / "first.jsonl", entries[:2])
    output = tmp_path / "out"
    common = ["run", "--output", str(output), "--max-new-tokens", "4", "--no-progress"]
    first = run_cli([*common, "--manifest", str(first_manifest), "--model", str(tiny_model_dir)])
    assert first.returncode == 0, first.stderr[-2000:]

    full_manifest = write_jsonl(tmp_path / "all.jsonl", entries)
    # B (TurboCTC, English only) serves en; A still serves fr (routing), so fr's new row is A's again.
    models = ["--model", str(tiny_ctc_dir), "--model", str(tiny_model_dir)]
    redo = run_cli([*common, "--manifest", str(full_manifest), *models, "--redo-model", str(tiny_model_dir)])
    assert redo.returncode == 0, redo.stderr[-2000:]
    table = committed(str(output))
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(e["id"] for e in entries)
    made_by = dict(zip(ids, table.column("model").to_pylist()))
    run_of = dict(zip(ids, table.column("run_id").to_pylist()))
    assert made_by["en_weather.flac"] == str(tiny_ctc_dir) and made_by["fr_gare.mp3"] == str(tiny_model_dir)
    assert len(set(run_of.values())) == 1  # every row is the second run's: two redone, one new
    summary = json.loads(max((output / "runs").glob("*.json"), key=lambda p: p.stat().st_mtime).read_text())
    assert summary["rows_redone"] == 2 and summary["rows_already_done"] == 0
    assert summary["redo"]["selected"] == {f"model == {tiny_model_dir}": 2}
    assert summary["redo"]["rows_replaced"] == 2


@pytest.mark.slow  # two CLI runs, one of them killed: ~3 min on 2 busy cores
def test_a_killed_redo_run_leaves_one_row_per_id_and_the_rerun_finishes(tmp_path, tiny_model_dir):
    """An archive made by an older model (written here directly); a redo run killed with SIGKILL while
    it replaces rows; every look at the output, during and after, finds each id once."""
    names = ["en_weather.flac", "fr_gare.mp3", "de_bibliothek.ogg", "es_mercado.m4a", "pt_praia.wav"]
    entries = [
        {"audio": str(SAMPLES / names[i % 5]), "language": names[i % 5][:2], "id": f"row-{i:03d}"} for i in range(30)
    ]
    output = tmp_path / "out"
    old = pa.concat_tables(
        [rows([e["id"]], OLD, "20250101T000000Z-old", language=e["language"]) for e in entries]
    ).set_column(1, "audio", pa.array([e["audio"] for e in entries]))
    commit(str(output), old, "20250101T000000Z-old", rows_per_file=7)
    manifest_path = write_jsonl(tmp_path / "m.jsonl", entries)
    config = tmp_path / "job.yaml"
    config.write_text(
        "rows_per_file: 2\nbatch_size: 2\ndecode_batch_size: 1\ncommit_interval_s: 1\nlease_expiry_s: 2\n"
    )
    args = ["run", "--manifest", str(manifest_path), "--output", str(output), "--model", str(tiny_model_dir)]
    args += ["--max-new-tokens", "4", "--no-progress", "--config", str(config), "--redo-model", OLD]
    process = subprocess.Popen(
        [sys.executable, "-m", "granite_batch.cli", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "jobs")},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    looks, replaced = 0, 0
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and process.poll() is None and replaced < 4:
        try:
            table = committed(str(output))
        except (OSError, pa.ArrowInvalid):  # a file replaced between listing and reading: look again
            continue
        ids = table.column("id").to_pylist()
        assert sorted(ids) == sorted(e["id"] for e in entries)  # each id exactly once, at every look
        replaced = sum(model != OLD for model in table.column("model").to_pylist())
        looks += 1
        time.sleep(0.1)
    assert process.poll() is None, "the run ended before it could be killed; make it longer"
    os.killpg(process.pid, signal.SIGKILL)  # the driver and the local Ray it started
    process.wait()
    table = committed(str(output))
    assert sorted(table.column("id").to_pylist()) == sorted(e["id"] for e in entries) and looks
    still_old = sum(model == OLD for model in table.column("model").to_pylist())
    assert 0 < still_old < len(entries)

    again = run_cli(args)
    assert again.returncode == 0, again.stderr[-2000:]
    table = committed(str(output))
    assert sorted(table.column("id").to_pylist()) == sorted(e["id"] for e in entries)
    assert set(table.column("model").to_pylist()) == {str(tiny_model_dir)}
    summary = max((json.loads(p.read_text()) for p in (output / "runs").glob("*.json")), key=lambda s: s["started_at"])
    assert summary["rows_redone"] == still_old and summary["rows_already_done"] == len(entries) - still_old
