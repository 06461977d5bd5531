"""The Python API on a Ray Dataset: `build_processor(config)(ds)` gives the rows `run` writes, and no files."""

from __future__ import annotations

import inspect
import json
import warnings

import pyarrow as pa
import pytest
import ray

from conftest import SAMPLES
from granite_batch import build_processor
from granite_batch.pipeline.actors import Transcriber
from granite_batch.pipeline.cluster import MODEL_ACTOR_RETRIES, RETRY_OPTIONS
from granite_batch.run.transcription import transcribe_files
from granite_batch.schema import transcript_schema

SAMPLE_ROWS = [json.loads(line) for line in (SAMPLES / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
OPTIONS = {"generation": {"max_new_tokens": 10}, "batch_size": 4}
# Columns that name the run, not the recording.
RUN_COLUMNS = ["run_id"]


def by_id(table: pa.Table) -> dict[str, dict]:
    return {row["id"]: row for row in table.drop_columns(RUN_COLUMNS).to_pylist()}


@pytest.fixture(scope="module")
def from_both(tmp_path_factory, tiny_model_dir):
    """The samples once through the `run` job and once through the processor on `ray.data.from_items`."""
    work = tmp_path_factory.mktemp("api")
    rows = [dict(row, audio=str(SAMPLES / row["audio"])) for row in SAMPLE_ROWS]
    job_rows = transcribe_files(rows, work / "out", model=str(tiny_model_dir), **OPTIONS)
    processor = build_processor({"model": str(tiny_model_dir), **OPTIONS})
    # The HF `Audio` layout for one row: its bytes, named by its path.
    embedded = dict(rows[0], audio={"bytes": (SAMPLES / SAMPLE_ROWS[0]["audio"]).read_bytes(), "path": "x.flac"})
    ds = processor(ray.data.from_items(rows))
    api_rows = pa.concat_tables(ds.iter_batches(batch_format="pyarrow", batch_size=None))
    api_embedded = processor(ray.data.from_items([embedded])).take_all()
    return {"job": job_rows, "api": api_rows, "embedded": api_embedded, "work": work, "processor": processor}


def test_the_processor_gives_the_rows_the_job_writes(from_both):
    job, api = by_id(from_both["job"]), by_id(from_both["api"])
    assert len(api) == len(SAMPLE_ROWS) == len(job)
    differing = {(key, column): (api[key][column], job[key].get(column)) for key in api for column in api[key]}
    differing = {where: pair for where, pair in differing.items() if pair[0] != pair[1]}
    assert not differing
    assert api == job
    assert all(row["text"] and row["error"] is None for row in api.values())


def test_rows_have_the_output_schema_and_the_processors_run_id(from_both):
    api = from_both["api"]
    passthrough = pa.schema([pa.field("reference", pa.string()), pa.field("speaker", pa.string())])
    assert api.schema.names == transcript_schema(passthrough).names
    assert set(api.column("run_id").to_pylist()) == {from_both["processor"].run_id}


def test_status_json_reads_the_runs_outcome(from_both, capsys):
    from granite_batch.cli import main

    assert main(["status", str(from_both["work"] / "out"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    (run,) = report["runs"]
    assert run["status"] == "succeeded" and run["rows_ok"] == len(SAMPLE_ROWS) and run["rows_failed"] == 0
    assert run["rtfx"] > 0 and report["lease"] is None
    assert report["rows"] == {"ok": len(SAMPLE_ROWS), "failed": 0, "failures_by_reason": {}}
    assert main(["status", str(from_both["work"] / "out"), "--json", "--run-id", "no-such-run"]) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == []


def test_nothing_is_written_beside_the_jobs_output(from_both):
    assert sorted(p.name for p in from_both["work"].iterdir()) == ["out"]


def test_embedded_audio_struct_is_transcribed_as_its_file_is(from_both):
    (row,) = from_both["embedded"]
    assert row["error"] is None
    assert row["audio"] == "x.flac"
    expected = by_id(from_both["job"])
    same = [r for r in expected.values() if r["audio"].endswith(SAMPLE_ROWS[0]["audio"])]
    assert row["text"] == same[0]["text"]


def test_a_row_without_usable_values_is_an_error_row(tiny_model_dir, from_both):
    rows = [{"path": str(SAMPLES / SAMPLE_ROWS[0]["audio"]), "language": "xx", "id": "bad"}]
    (row,) = from_both["processor"](ray.data.from_items(rows)).take_all()
    assert row["id"] == "bad" and row["text"] is None and "xx" in row["error"]


def test_read_binary_files_rows_and_path_rows_are_manifest_rows():
    from granite_batch.inputs.normalise import normalise_rows
    from granite_batch.inputs.rows import Defaults

    data = (SAMPLES / SAMPLE_ROWS[0]["audio"]).read_bytes()
    binary = normalise_rows(pa.table({"bytes": [data], "path": ["calls/a.flac"]}), Defaults(language="fr"))
    assert binary.column("audio").to_pylist() == ["calls/a.flac"]
    assert binary.column("audio_bytes").to_pylist() == [data]
    assert binary.column("language").to_pylist() == ["fr"]
    paths = normalise_rows(pa.table({"path": ["/data/b.wav"], "speaker": ["x"]}), Defaults())
    assert paths.column("audio").to_pylist() == ["/data/b.wav"] and paths.column("speaker").to_pylist() == ["x"]
    assert binary.column("id").to_pylist() != paths.column("id").to_pylist()


def test_building_the_stages_warns_of_nothing_ray_deprecates(from_both):
    """Our retry options reach Ray without its `ray_remote_args` deprecation warning on every run."""
    rows = [dict(SAMPLE_ROWS[0], audio=str(SAMPLES / SAMPLE_ROWS[0]["audio"]))]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = from_both["processor"](ray.data.from_items(rows))  # lazy: the stages are built, not run
    assert not [w for w in caught if "ray_remote_args" in str(w.message)]
    # Passed all the same: the model stage asks Ray to restart its actor and never to retry its batch.
    stage = ds._logical_plan.dag
    while getattr(stage, "fn", None) is not Transcriber:  # down the chain to the model actor's stage
        stage = stage.input_dependencies[0]
    assert {k: stage.ray_remote_args[k] for k in MODEL_ACTOR_RETRIES} == MODEL_ACTOR_RETRIES
    # Its own constructor arguments are small (Ray sends arguments under 100 KB inline, not through the
    # object store): Ray's restart warning comes from Ray Data's context and transformer references.
    assert len(ray.cloudpickle.dumps(stage.fn_constructor_kwargs)) < 100 * 1024


def test_ray_still_names_no_retry_parameter():
    """When `map_batches` names these, pass them by name and drop pipeline.cluster's warning filter."""
    assert not set(RETRY_OPTIONS) & set(inspect.signature(ray.data.Dataset.map_batches).parameters)
