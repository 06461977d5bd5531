"""Delta output: the transcripts as a Delta table, each commit a merge on `id`, so concurrent writers,
redo and retries never give an id two rows; compaction through the format's optimize."""

from __future__ import annotations

import subprocess
import sys
import threading

import deltalake  # a dev dependency: CI installs it, so these tests never skip
import pyarrow as pa
import pytest

from conftest import REPO, SAMPLES, run_cli, write_jsonl
from granite_batch import results
from granite_batch.inputs.plan import count_status, plan_counts, prepare_plan
from granite_batch.inputs.redo import parse_selections
from granite_batch.output.delta import DeltaWriter, delta_dataset, delta_version, is_delta
from granite_batch.schema import transcript_schema
from granite_batch.storage import OutputRoot
from test_redo import NEW, OLD, manifest, rows


def ids_and_models(output: str, options=None) -> list[tuple[str, str]]:
    table = delta_dataset(OutputRoot(output, options)).to_table(columns=["id", "model"])
    return sorted(zip(table.column("id").to_pylist(), table.column("model").to_pylist()))


def write(output: str, table: pa.Table, run_id: str, options=None, rows_per_file: int = 1000) -> DeltaWriter:
    writer = DeltaWriter(OutputRoot(output, options), run_id, transcript_schema(), rows_per_file=rows_per_file)
    writer.write(table)
    writer.close()
    return writer


@pytest.fixture(params=["local", "s3"])
def output(request, tmp_path):
    """A Delta output root on the local filesystem or on the S3 server (one request at a time, so its
    conditional PUT is atomic as S3's is: conftest's atomic_s3_server)."""
    if request.param == "local":
        return str(tmp_path / "out"), None
    endpoint = request.getfixturevalue("atomic_s3_server")
    import s3fs

    bucket = f"delta-{tmp_path.name.replace('_', '-').lower()[-40:]}"
    s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint}, skip_instance_cache=True).mkdir(bucket)
    return f"s3://{bucket}/out", {"s3": {"endpoint_url": endpoint}}


def test_commits_merge_on_id_and_plans_read_the_current_version(output, tmp_path):
    uri, options = output
    write(uri, rows(["a", "b", "c"], OLD, "r1"), "r1", options)
    write(uri, rows(["d"], OLD, "r1", language="fr"), "r1b", options)
    assert is_delta(OutputRoot(uri, options))
    stream = manifest(tmp_path, list("abcde"))
    stream.storage_options = options
    layout = prepare_plan(
        stream, OutputRoot(uri, options), str(tmp_path / "plan"), redo=parse_selections(["id == b", "id == d"])
    )
    counts = plan_counts(layout)
    assert counts["rows_to_do"] == 3 and counts["rows_redone"] == 2 and counts["rows_already_done"] == 2
    assert layout.committed.rows_selected == [1, 1] and layout.committed.foreign_files == []

    writer = write(uri, rows(["b", "e"], NEW, "r2"), "r2", options)  # b's row replaced in the same commit
    assert writer.rows_replaced == 1
    assert ids_and_models(uri, options) == [("a", OLD), ("b", NEW), ("c", OLD), ("d", OLD), ("e", NEW)]
    loaded = results.load(uri, storage_options=options, language="en")
    assert sorted(loaded.column("id").to_pylist()) == ["a", "b", "c", "e"]
    assert count_status(OutputRoot(uri, options), None).committed.rows_ok == 5


def test_concurrent_writers_never_give_an_id_two_rows(output):
    uri, options = output
    write(uri, rows(["seed"], OLD, "r0"), "r0", options)
    failures: list[BaseException] = []

    def writer(name: str) -> None:
        try:  # every writer commits every id, in two commits, racing the others
            ids = [f"id{i}" for i in range(12)]
            out = DeltaWriter(OutputRoot(uri, options), name, transcript_schema(), rows_per_file=6)
            out.write(rows(ids[:6], name, name))
            out.write(rows(ids[6:], name, name, language="fr"))
            out.close()
        except BaseException as exc:  # noqa: BLE001  (reported by the assertion below)
            failures.append(exc)

    threads = [threading.Thread(target=writer, args=(f"run{n}",)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures
    found = ids_and_models(uri, options)
    ids = [row_id for row_id, _ in found]
    assert sorted(set(ids)) == sorted(ids) and len(ids) == 13
    assert delta_version(OutputRoot(uri, options)) == 8  # the seed, then two commits per writer: none lost


def test_compact_runs_the_format_optimize_and_keeps_the_rows(tmp_path):
    uri = str(tmp_path / "out")
    for night in range(5):
        write(uri, rows([f"n{night}-{i}" for i in range(3)], OLD, f"r{night}"), f"r{night}")
    before = ids_and_models(uri)
    table = deltalake.DeltaTable(f"{uri}/transcripts")
    assert len(table.file_uris()) == 5
    done = run_cli(["compact", uri], timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "5 files -> 1" in done.stdout
    assert ids_and_models(uri) == before and len(deltalake.DeltaTable(f"{uri}/transcripts").file_uris()) == 1


def test_parquet_and_delta_outputs_are_not_mixed(tmp_path, tiny_model_dir):
    uri = str(tmp_path / "out")
    write(uri, rows(["a"], OLD, "r1"), "r1")
    entries = [{"audio": str(SAMPLES / "en_weather.flac"), "id": "a"}]
    args = ["run", "--manifest", str(write_jsonl(tmp_path / "m.jsonl", entries)), "--output", uri]
    refused = run_cli([*args, "--model", str(tiny_model_dir), "--no-progress"], timeout=300)
    assert refused.returncode == 2 and "--format delta" in refused.stderr


@pytest.mark.slow  # two concurrent CLI runs: ~3 min on 2 busy cores
@pytest.mark.parametrize("ray_cluster", [{"head_cpus": 4}], indirect=True)
def test_two_concurrent_runs_on_a_delta_output_give_each_id_one_row(tmp_path, tiny_model_dir, ray_cluster):
    """Both runs on one Ray (two embedded Rays starting at once time out on a loaded 2-core machine)."""
    entries = [{"audio": str(SAMPLES / name), "id": name} for name in ("en_weather.flac", "pt_praia.wav")]
    entries[1]["language"] = "pt"
    manifest_path = write_jsonl(tmp_path / "m.jsonl", entries)
    uri = str(tmp_path / "out")
    command = [sys.executable, "-m", "granite_batch.cli", "run", "--manifest", str(manifest_path), "--output", uri]
    command += ["--model", str(tiny_model_dir), "--format", "delta", "--max-new-tokens", "4", "--no-progress"]
    env = {**ray_cluster["env"], "RAY_ADDRESS": ray_cluster["gcs"], "PYTHONPATH": str(REPO / "jobs")}
    runs = [subprocess.Popen(command, cwd=REPO, env=env, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    for run in runs:
        _, stderr = run.communicate(timeout=900)
        assert run.returncode == 0, stderr[-2000:]
    table = delta_dataset(OutputRoot(uri)).to_table(columns=["id", "error"])
    assert sorted(table.column("id").to_pylist()) == sorted(e["id"] for e in entries)  # each once
    assert table.column("error").null_count == 2
