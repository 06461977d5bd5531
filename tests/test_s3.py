"""Object storage for real: the job against a live S3 API server, with and without faults."""

from __future__ import annotations

import json
import pickle

import pyarrow.dataset as pads
import pytest

from conftest import FAKE_SECRET, SAMPLES, FaultyProxy, run_cli
from granite_batch.config import load_config
from granite_batch.inputs.manifest import list_recordings, read_manifest
from granite_batch.inputs.rows import Defaults
from granite_batch.storage import OutputRoot, write_json

SAMPLE_FILES = sorted(p.name for p in SAMPLES.iterdir() if p.suffix in (".flac", ".mp3", ".ogg", ".m4a", ".wav"))


def upload_samples(s3, bucket: str) -> None:
    s3.mkdir(bucket)
    for name in SAMPLE_FILES:
        language = name.split("_")[0]
        s3.put(str(SAMPLES / name), f"{bucket}/samples/{name}")
        s3.put(str(SAMPLES / name), f"{bucket}/archive/{language}/2026/{name}")
    s3.put(str(SAMPLES / "manifest.jsonl"), f"{bucket}/samples/manifest.jsonl")


def read_s3_output(s3, root: str):
    return pads.dataset(f"{root}/transcripts", filesystem=s3, format="parquet", partitioning="hive").to_table()


def test_prefix_listing_with_language_pattern_equals_the_manifest(s3, s3_server):
    upload_samples(s3, "listing")
    options = {"s3": {"endpoint_url": s3_server}}
    listed = list_recordings("s3://listing/archive/{language}/**/*.*", Defaults(), options).table.to_pylist()
    assert sorted((r["language"], r["audio"].rsplit("/", 1)[1]) for r in listed) == sorted(
        (name.split("_")[0], name) for name in SAMPLE_FILES
    )
    plain = list_recordings("s3://listing/archive/", Defaults(language="de"), options).table.to_pylist()
    assert len(plain) == len(SAMPLE_FILES) and {r["language"] for r in plain} == {"de"}
    only_flac = list_recordings("s3://listing/archive/**/*.flac", Defaults(), options).table.to_pylist()
    assert sorted(r["audio"].rsplit("/", 1)[1] for r in only_flac) == ["en_weather.flac", "ja_tenki.flac"]
    manifest = read_manifest("s3://listing/samples/manifest.jsonl", Defaults(), options).table.to_pylist()
    assert manifest[0]["audio"] == "s3://listing/samples/en_weather.flac"


@pytest.fixture(scope="module")
def s3_job(s3_server, tiny_model_dir, tmp_path_factory):
    import s3fs

    s3 = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server}, skip_instance_cache=True)
    upload_samples(s3, "archive")
    result = run_cli(
        [
            "run",
            "--manifest",
            "s3://archive/samples/manifest.jsonl",
            "--output",
            "s3://archive/out",
            "--endpoint-url",
            s3_server,
            "--model",
            str(tiny_model_dir),
            "--max-new-tokens",
            "8",
            "--no-progress",
            "--run-id",
            "s3-run",
            "-v",
        ]
    )
    return {"result": result, "s3": s3}


def test_an_output_root_makes_its_filesystem_once_and_travels_without_it(s3, s3_server):
    s3.mkdir("root")
    root = OutputRoot("s3://root/out", {"s3": {"endpoint_url": s3_server}})
    assert root.fs is root.fs and root.path == "root/out"
    assert root.uri_of(root.join("runs", "r.json")) == "s3://root/out/runs/r.json"
    travelled = pickle.loads(pickle.dumps(root))  # as it reaches a Ray task: options, not a client
    assert travelled == root and "fs_and_path" not in travelled.__dict__
    assert write_json(travelled, "runs/r.json", {"run_id": "r"}) == "s3://root/out/runs/r.json"
    assert json.loads(s3.cat("root/out/runs/r.json")) == {"run_id": "r"}


def test_job_reads_and_writes_s3(s3_job):
    result, s3 = s3_job["result"], s3_job["s3"]
    assert result.returncode == 0, result.stderr[-3000:]
    table = read_s3_output(s3, "archive/out")
    rows = table.to_pylist()
    ids = [r["id"] for r in rows]
    assert len(ids) == len(set(ids)) == 8
    assert all(r["error"] is None and r["audio"].startswith("s3://archive/samples/") for r in rows)
    assert {p.rsplit("/", 1)[1] for p in s3.ls("archive/out/transcripts")} == {
        f"language={lang}" for lang in ("en", "fr", "de", "es", "pt", "ja")
    }
    assert not s3.exists("archive/out/_staging/s3-run")
    summary = json.loads(s3.cat("archive/out/runs/s3-run.json"))
    assert summary["rows_ok"] == 8 and all(f.startswith("s3://archive/out/transcripts/") for f in summary["files"])


def test_secrets_never_reach_outputs_or_logs(s3_job):
    result, s3 = s3_job["result"], s3_job["s3"]
    assert FAKE_SECRET not in result.stdout and FAKE_SECRET not in result.stderr
    for path in s3.find("archive/out"):
        assert FAKE_SECRET.encode() not in s3.cat(path), path


def test_transient_faults_are_retried_and_a_deleted_object_is_one_error_row(s3, s3_server, tiny_model_dir):
    upload_samples(s3, "flaky")
    s3.rm("flaky/samples/de_bibliothek.ogg")
    proxy = FaultyProxy(s3_server, every=5)
    try:
        result = run_cli(
            [
                "run",
                "--manifest",
                "s3://flaky/samples/manifest.jsonl",
                "--output",
                "s3://flaky/out",
                "--endpoint-url",
                proxy.url,
                "--model",
                str(tiny_model_dir),
                "--max-new-tokens",
                "4",
                "--no-progress",
            ]
        )
    finally:
        proxy.close()
    assert result.returncode == 0, result.stderr[-3000:]
    assert proxy.faults >= 5  # the faults really happened
    rows = {
        r["audio"].rsplit("/", 1)[1] + ":" + r["task"] + str(len(r["segments"])): r
        for r in read_s3_output(s3, "flaky/out").to_pylist()
    }
    assert len(rows) >= 7
    errors = {key: r["error"] for key, r in rows.items() if r["error"] is not None}
    assert list(errors) == ["de_bibliothek.ogg:asr0"]
    assert errors["de_bibliothek.ogg:asr0"] == "not found: s3://flaky/samples/de_bibliothek.ogg"


def test_endpoint_and_anonymous_access_are_job_config(tmp_path):
    config = load_config(
        overrides={
            "manifest": "s3://b/m.jsonl",
            "output": "s3://b/out",
            "storage_options": {"s3": {"endpoint_url": "http://minio:9000", "anon": True}},
        }
    )
    assert config.public_dict()["storage_options"] == {"s3": ["anon", "endpoint_url"]}
