"""The inputs users already have: embedded audio (Hugging Face's `Audio` layout), tar shards of
flac + json, https URLs, and calls recorded per channel. Each gives what the same recordings give
listed by path."""

from __future__ import annotations

import io
import json
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr

from conftest import SAMPLES, run_cli
from granite_batch.audio.decode import decode_table, load_recording
from granite_batch.audio.segment import segment_table
from granite_batch.inference.assemble import RecordingAssembler, join_segments
from granite_batch.inference.transcribe import transcribe_segments
from granite_batch.inputs import shards
from granite_batch.inputs.manifest import ManifestStream, list_recordings, read_manifest
from granite_batch.inputs.rows import Defaults, ManifestError, content_digest, default_id
from granite_batch.models.model import SpeechModel
from granite_batch.storage import OutputRoot
from web_server import WebServer

NAMES = ["en_weather.flac", "fr_gare.mp3", "es_mercado.m4a", "ja_tenki.flac"]
LANGUAGES = {"en_weather.flac": "en", "fr_gare.mp3": "fr", "es_mercado.m4a": "es", "ja_tenki.flac": "ja"}
HF_AUDIO = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


@pytest.fixture(scope="module")
def web():
    server = WebServer(SAMPLES)
    yield server
    server.close()


@pytest.fixture(scope="module")
def speech_model(tiny_model_dir):
    return SpeechModel.load(str(tiny_model_dir), max_new_tokens=None, max_new_tokens_per_audio_s=3.0)


def transcripts(rows: pa.Table, speech_model: SpeechModel, max_segment_s: float = 30.0) -> dict[str, dict]:
    """The job's stages on normalised manifest rows, in this process: id -> the recording's row."""
    segments = segment_table(decode_table(rows, isolate=False), 16000, max_segment_s, isolate=False)
    return {row["id"]: row for row in RecordingAssembler().add(transcribe_segments(segments, speech_model)).to_pylist()}


def by_path(names=NAMES) -> pa.Table:
    return read_manifest_rows(
        [{"audio": str(SAMPLES / name), "id": name, "language": LANGUAGES[name]} for name in names]
    )


def read_manifest_rows(rows: list[dict], tmp_name: str = "/tmp/granite-batch-inputs-by-path.jsonl") -> pa.Table:
    with open(tmp_name, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in rows)
    return read_manifest(tmp_name, Defaults()).table


def hf_parquet(path, names=NAMES, **columns) -> str:
    """A Parquet manifest in Hugging Face's `Audio` layout: struct<bytes, path>, plus `columns`."""
    audio = [{"bytes": (SAMPLES / name).read_bytes(), "path": name} for name in names]
    table = pa.table(
        {"audio": pa.array(audio, HF_AUDIO), "id": names, "language": [LANGUAGES[n] for n in names], **columns}
    )
    pq.write_table(table, path, row_group_size=2)
    return str(path)


def add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_shard(path, names=NAMES, with_ids: bool = True) -> None:
    """A WebDataset-style shard: `<key>.<ext>` audio and `<key>.json` sidecars, in key order."""
    with tarfile.open(path, "w") as tar:
        for number, name in enumerate(names):
            key = f"sample{number:04d}"
            extension = name.split(".", 1)[1]
            add_member(tar, f"{key}.{extension}", (SAMPLES / name).read_bytes())
            sidecar = {"language": LANGUAGES[name], "reference": f"reference of {name}"}
            if with_ids:
                sidecar["id"] = name
            add_member(tar, f"{key}.json", json.dumps(sidecar).encode())
        add_member(tar, "README.txt", b"not a sample")


# --- embedded audio --------------------------------------------------------------------------------


def test_hf_audio_rows_keep_their_path_as_name_and_stable_ids(tmp_path):
    data = (SAMPLES / "en_weather.flac").read_bytes()
    table = pa.table(
        {
            "audio": pa.array(
                [
                    {"bytes": data, "path": "clips/en_weather.flac"},
                    {"bytes": data, "path": None},
                    {"bytes": None, "path": "fr_gare.mp3"},  # no bytes: read from its path, relative to the manifest
                ],
                HF_AUDIO,
            ),
            "text_reference": ["a", "b", "c"],
        }
    )
    pq.write_table(table, tmp_path / "m.parquet")
    defaults = Defaults(allowed_prefixes=(str(tmp_path),))
    first = read_manifest(str(tmp_path / "m.parquet"), defaults).table.to_pylist()
    again = read_manifest(str(tmp_path / "m.parquet"), defaults).table.to_pylist()
    assert [r["id"] for r in first] == [r["id"] for r in again] and len({r["id"] for r in first}) == 3
    assert first[0]["audio"] == "clips/en_weather.flac" and first[0]["audio_bytes"] == data
    assert first[1]["audio"].startswith("embedded:") and first[1]["audio_bytes"] == data
    assert first[2]["audio"] == str(tmp_path / "fr_gare.mp3") and first[2]["audio_bytes"] is None
    # The allow-list is for what is read from storage; embedded audio is read from nowhere.
    assert [r["error"] for r in first[:2]] == [None, None]
    assert first[2]["error"] is None
    assert (
        read_manifest(str(tmp_path / "m.parquet"), Defaults(allowed_prefixes=("/elsewhere/",)))
        .table.column("error")
        .to_pylist()[2]
        .startswith("not allowed: ")
    )


def test_parquet_blocks_of_embedded_audio_are_sized_by_bytes(tmp_path):
    path = hf_parquet(tmp_path / "m.parquet")
    # The four recordings hold 87-185 kB each: 200 kB blocks hold two of them, tiny blocks one.
    assert [b.num_rows for b in ManifestStream(path, Defaults(), block_bytes=200_000)] == [2, 2]
    assert [b.num_rows for b in ManifestStream(path, Defaults(), block_bytes=1)] == [1, 1, 1, 1]
    assert [b.num_rows for b in ManifestStream(path, Defaults())] == [len(NAMES)]


def test_embedded_rows_decode_to_the_same_samples_from_memory(tmp_path):
    embedded = decode_table(read_manifest(hf_parquet(tmp_path / "m.parquet"), Defaults()).table, isolate=False)
    listed = decode_table(by_path(), isolate=False)
    assert "audio_bytes" not in embedded.column_names  # the bytes stop at the decoder
    assert embedded.column("error").null_count == len(NAMES)
    for a, b in zip(embedded.column("samples").to_pylist(), listed.column("samples").to_pylist()):
        assert np.array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_empty_and_corrupt_bytes_are_row_errors(tmp_path):
    table = pa.table({"audio": pa.array([b"", b"\x00garbage" * 100], pa.binary())})
    pq.write_table(table, tmp_path / "m.parquet")
    decoded = decode_table(read_manifest(str(tmp_path / "m.parquet"), Defaults()).table, isolate=False)
    errors = decoded.column("error").to_pylist()
    assert errors[0] == "decode failed: empty file (0 bytes)"
    assert errors[1].startswith("decode failed: ")


# --- tar shards ------------------------------------------------------------------------------------


def test_tar_shard_listed_like_a_folder_gives_the_by_path_transcripts(tmp_path, speech_model):
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "part-000.tar", NAMES[:2])
    write_shard(tmp_path / "shards" / "part-001.tar", NAMES[2:], with_ids=False)
    listed = list_recordings(str(tmp_path / "shards" / "*.tar"), Defaults(), chunk_rows=3)
    rows = listed.table.to_pylist()
    assert [r["audio"] for r in rows] == [
        f"tar://sample{n % 2:04d}.{name.split('.', 1)[1]}::{tmp_path}/shards/part-00{n // 2}.tar"
        for n, name in enumerate(NAMES)
    ]
    assert [r["id"] for r in rows[:2]] == NAMES[:2]  # the sidecar's id
    # No sidecar id: the shard, the member and its bytes.
    assert rows[2]["id"] == default_id(rows[2]["audio"], "asr", None, [], content_digest(rows[2]["audio_bytes"]))
    assert [r["language"] for r in rows] == [LANGUAGES[n] for n in NAMES]
    assert [r["reference"] for r in rows] == [f"reference of {n}" for n in NAMES]
    assert "reference" in listed.passthrough

    from_shards = transcripts(listed.table, speech_model)
    from_paths = transcripts(by_path(), speech_model)
    for row, name in zip(rows, NAMES):
        assert from_shards[row["id"]]["error"] is None
        assert from_shards[row["id"]]["text"] == from_paths[name]["text"]
        assert from_shards[row["id"]]["segments"] == from_paths[name]["segments"]


def test_shards_stream_from_object_storage(tmp_path, s3, s3_server):
    write_shard(tmp_path / "part-000.tar", NAMES[:2])
    s3.mkdir("shard-bucket")
    s3.put(str(tmp_path / "part-000.tar"), "shard-bucket/shards/part-000.tar")
    listed = list_recordings(
        "s3://shard-bucket/shards/*.tar", Defaults(), {"s3": {"client_kwargs": {"endpoint_url": s3_server}}}
    ).table.to_pylist()
    assert [r["audio"] for r in listed] == [
        "tar://sample0000.flac::s3://shard-bucket/shards/part-000.tar",
        "tar://sample0001.mp3::s3://shard-bucket/shards/part-000.tar",
    ]
    assert [r["audio_bytes"] for r in listed] == [(SAMPLES / n).read_bytes() for n in NAMES[:2]]


def test_a_sidecar_text_column_asks_for_the_reference_column(tmp_path):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        add_member(tar, "a.flac", (SAMPLES / "en_weather.flac").read_bytes())
        add_member(tar, "a.json", json.dumps({"text": "the weather"}).encode())
    with pytest.raises(ManifestError, match=r"'text' is reserved .*--reference-column text"):
        list_recordings(str(tmp_path / "s.tar"), Defaults())
    rows = list_recordings(str(tmp_path / "s.tar"), Defaults(reference_column="text")).table
    assert rows.column("reference").to_pylist() == ["the weather"]


def ordinary_shard(path, names=NAMES) -> None:
    """A shard made the ordinary way, `tar cf shard.tar *.flac *.mp3 ... *.json`: every audio
    member first, then every sidecar, so no sidecar lies next to its audio."""
    with tarfile.open(path, "w") as tar:
        for name in names:
            add_member(tar, name, (SAMPLES / name).read_bytes())
        for name in names:
            sidecar = {"id": f"id-{name}", "language": LANGUAGES[name], "reference": f"reference of {name}"}
            add_member(tar, name.split(".")[0] + ".json", json.dumps(sidecar).encode())


@pytest.mark.parametrize("held_bytes", [shards.HELD_BYTES, 1])
def test_sidecars_are_matched_by_key_anywhere_in_the_shard(tmp_path, monkeypatch, held_bytes):
    monkeypatch.setattr(shards, "HELD_BYTES", held_bytes)  # 1: every audio member is read again
    ordinary_shard(tmp_path / "s.tar")
    rows = {r["id"]: r for r in list_recordings(str(tmp_path / "s.tar"), Defaults()).table.to_pylist()}
    assert sorted(rows) == sorted(f"id-{name}" for name in NAMES)
    for name in NAMES:
        row = rows[f"id-{name}"]
        assert row["language"] == LANGUAGES[name] and row["reference"] == f"reference of {name}"
        assert row["audio_bytes"] == (SAMPLES / name).read_bytes() and row["error"] is None


def test_link_members_are_error_rows_and_skipped_members_are_counted(tmp_path, caplog):
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        add_member(tar, "a.flac", (SAMPLES / "en_weather.flac").read_bytes())
        for kind, name in ((tarfile.LNKTYPE, "b.flac"), (tarfile.SYMTYPE, "c.flac"), (tarfile.SYMTYPE, "d.json")):
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, "a.flac"
            tar.addfile(info)
        add_member(tar, "b.json", json.dumps({"id": "the-b"}).encode())
        add_member(tar, "notes.txt", b"not a sample")
        add_member(tar, "orphan.json", b"{}")
    stream = ManifestStream(str(tmp_path / "s.tar"), Defaults(), listing=True)
    with caplog.at_level("WARNING"):
        rows = {r["audio"].split("::")[0]: r for r in pa.concat_tables(list(stream)).to_pylist()}
    assert rows["tar://a.flac"]["error"] is None
    assert rows["tar://b.flac"]["id"] == "the-b"  # the sidecar still names the row
    assert rows["tar://b.flac"]["error"] == (
        "not a regular file: shard member b.flac is a hard link to a.flac (store the recording itself in the shard)"
    )
    assert rows["tar://c.flac"]["error"].startswith("not a regular file: shard member c.flac is a symbolic link")
    assert dict(stream.shard_counts.skipped) == {
        "neither audio nor a .json sidecar": 1,
        "a sidecar that is a symbolic link": 1,
        "a sidecar without audio": 1,
    }
    assert "1 shard member(s) skipped: a sidecar without audio" in caplog.text


def test_a_shard_that_is_not_a_tar_stops_the_job_naming_it(tmp_path):
    (tmp_path / "broken.tar").write_bytes(b"\x01" * 2000)
    with pytest.raises(ManifestError, match="broken.tar: not a readable tar shard"):
        list_recordings(str(tmp_path / "*.tar"), Defaults())
    with tarfile.open(tmp_path / "bad-sidecar.tar", "w") as tar:
        add_member(tar, "a.flac", (SAMPLES / "en_weather.flac").read_bytes())
        add_member(tar, "a.json", b"{not json")
    with pytest.raises(ManifestError, match="bad-sidecar.tar: member a.json: malformed JSON"):
        list_recordings(str(tmp_path / "bad-sidecar.tar"), Defaults())


# --- http(s) -----------------------------------------------------------------------------------------


def test_url_rows_decode_and_failures_are_row_errors(web):
    allowed = tuple(
        f"{web.url}/{kind}/" for kind in ("files", "moved", "missing", "forbidden", "drop", "away", "flaky", "cut")
    )
    rows = read_manifest_rows(
        [
            {"audio": url}
            for url in [
                f"{web.url}/files/fr_gare.mp3",
                f"{web.url}/files/es_mercado.m4a",
                f"{web.url}/moved/fr_gare.mp3",
                f"{web.url}/missing/x.flac",
                f"{web.url}/forbidden/x.flac",
                f"{web.url}/drop/x.flac",
                f"{web.url}/away/fr_gare.mp3",
                "http://localhost:1/files/fr_gare.mp3",
                f"{web.url}/flaky/fr_gare.mp3",
                f"{web.url}/cut/en_weather.flac",
            ]
        ],
        "/tmp/granite-batch-urls.jsonl",
    )
    rows = read_manifest("/tmp/granite-batch-urls.jsonl", Defaults(allowed_prefixes=allowed)).table
    decoded = decode_table(rows, isolate=False, allowed_prefixes=allowed)
    errors = decoded.column("error").to_pylist()
    samples = decoded.column("samples").to_pylist()
    assert errors[:3] == [None, None, None]
    for got, name in [(samples[0], "fr_gare.mp3"), (samples[1], "es_mercado.m4a"), (samples[2], "fr_gare.mp3")]:
        assert np.array_equal(np.asarray(got, np.float32), load_recording(str(SAMPLES / name)).samples)
    assert errors[3] == f"not found: {web.url}/missing/x.flac"
    assert errors[4] == f"access denied: {web.url}/forbidden/x.flac"
    assert errors[5].startswith("read failed: ") and errors[5].endswith("(after 4 attempts)")
    assert web.requests.count("HEAD /drop/x.flac") == 4  # retried, then given up
    assert errors[6] == (
        f"not allowed: {web.url}/away/fr_gare.mp3 redirects to "
        f"http://localhost:{web.port}/files/fr_gare.mp3, outside the allowed prefixes"
    )
    assert errors[7] == "not allowed: http://localhost:1/files/fr_gare.mp3 is outside the allowed prefixes"
    assert not any(request.startswith("GET /away") for request in web.requests)
    # A dropped connection is retried: the second try succeeds; a body cut short every time fails.
    assert errors[8] is None and np.array_equal(np.asarray(samples[8], np.float32), samples[0])
    assert errors[9].startswith("read failed: ") and errors[9].endswith("(after 4 attempts)")


# --- split channels ----------------------------------------------------------------------------------


def at_16k(name: str) -> np.ndarray:
    samples, rate = sf.read(SAMPLES / name, dtype="float32")
    return soxr.resample(samples, rate, 16000).astype(np.float32)


def test_split_channels_give_each_channel_its_own_segments_in_time_order(tmp_path, speech_model):
    left, right = at_16k("en_weather.flac"), at_16k("ja_tenki.flac")
    gap = 16000 * 5  # the right channel speaks after the left has finished
    length = gap + len(right) + 8000
    stereo = np.zeros((length, 2), np.float32)
    stereo[8000 : 8000 + len(left), 0] = left
    stereo[gap : gap + len(right), 1] = right
    sf.write(tmp_path / "call.wav", stereo, 16000, subtype="FLOAT")
    for channel in (0, 1):
        sf.write(tmp_path / f"channel{channel}.wav", stereo[:, channel], 16000, subtype="FLOAT")
    silent = stereo.copy()
    silent[:, 1] = 0.0
    sf.write(tmp_path / "one_sided.wav", silent, 16000, subtype="FLOAT")
    rows = read_manifest_rows(
        [
            {"audio": str(tmp_path / "call.wav"), "id": "call", "channels": "split"},
            {"audio": str(tmp_path / "one_sided.wav"), "id": "one-sided", "channels": "split"},
            {"audio": str(tmp_path / "call.wav"), "id": "mixed"},
            {"audio": str(tmp_path / "channel0.wav"), "id": "alone-0"},
            {"audio": str(tmp_path / "channel1.wav"), "id": "alone-1"},
        ],
        "/tmp/granite-batch-channels.jsonl",
    )
    out = transcripts(rows, speech_model, max_segment_s=5.0)

    call = out["call"]["segments"]
    assert {s["channel"] for s in call} == {0, 1}
    assert [s["start"] for s in call] == sorted(s["start"] for s in call)
    assert min(s["start"] for s in call if s["channel"] == 1) >= 4.5
    for channel in (0, 1):
        alone = out[f"alone-{channel}"]["segments"]
        mine = [s for s in call if s["channel"] == channel]
        assert [(s["start"], s["end"], s["text"]) for s in mine] == [(s["start"], s["end"], s["text"]) for s in alone]
    assert out["call"]["text"] == join_segments(call, " ")
    assert out["call"]["text"].startswith("[channel 0] ") and "\n[channel 1] " in out["call"]["text"]
    assert all(s["channel"] is None for s in out["mixed"]["segments"])

    one_sided = out["one-sided"]["segments"]  # the silent channel costs its VAD, and gives nothing
    assert {s["channel"] for s in one_sided} == {0}
    assert [s["text"] for s in one_sided] == [s["text"] for s in out["alone-0"]["segments"]]


def test_reference_column_is_read_as_reference(tmp_path):
    path = hf_parquet(tmp_path / "m.parquet", text=[f"said {n}" for n in NAMES])
    with pytest.raises(ManifestError, match="column 'text' is reserved"):
        read_manifest(path, Defaults())
    table = read_manifest(path, Defaults(reference_column="text")).table
    assert table.column("reference").to_pylist() == [f"said {n}" for n in NAMES]


def test_channels_mode_comes_from_the_row_or_the_job(tmp_path):
    rows = [
        {"audio": "/a.wav"},
        {"audio": "/b.wav", "channels": "split"},
        {"audio": "/c.wav", "channels": "Mix"},
        {"audio": "/d.wav", "channels": "left"},
    ]
    read = read_manifest_rows(rows, "/tmp/granite-batch-modes.jsonl").to_pylist()
    assert [r["channels"] for r in read[:3]] == ["mix", "split", "mix"]
    assert read[3]["error"] == "unsupported channels 'left'; use mix or split"
    job_default = read_manifest("/tmp/granite-batch-modes.jsonl", Defaults(channels="split")).table
    assert job_default.column("channels").to_pylist()[0] == "split"


# --- the whole job ------------------------------------------------------------------------------------


def test_job_over_embedded_audio_urls_and_paths_gives_one_transcript_per_recording(tmp_path, tiny_model_dir, web):
    """One real run (Ray, the CLI): the same recordings embedded, by URL and by path give the same
    text; URL failures are row errors; a split-channel row carries its channels; the run is scored
    against the embedded dataset's reference texts (its `text` column, as HF's test sets name it)."""
    names = NAMES[:3]
    audio = (
        [{"bytes": (SAMPLES / n).read_bytes(), "path": n} for n in names]
        + [{"bytes": None, "path": f"{web.url}/files/{n}"} for n in names]
        + [{"bytes": None, "path": str(SAMPLES / n)} for n in names]
        + [
            {"bytes": None, "path": f"{web.url}/missing/x.flac"},
            {"bytes": None, "path": f"{web.url}/away/en_weather.flac"},
            {"bytes": (SAMPLES / "pt_praia.wav").read_bytes(), "path": "pt_praia.wav"},
        ]
    )
    ids = [f"{kind}-{n}" for kind in ("embedded", "url", "path") for n in names] + ["missing", "away", "split"]
    table = pa.table(
        {
            "audio": pa.array(audio, HF_AUDIO),
            "id": ids,
            "language": [LANGUAGES[n] for n in names] * 3 + ["en", "en", "pt"],
            "channels": [None] * 11 + ["split"],
            "text": [f"reference {i}" for i in range(12)],  # HF test sets' name for the reference
        }
    )
    pq.write_table(table, tmp_path / "hf.parquet", row_group_size=3)
    output = tmp_path / "out"
    result = run_cli(
        [
            "run",
            "--manifest",
            str(tmp_path / "hf.parquet"),
            "--output",
            str(output),
            "--model",
            str(tiny_model_dir),
            "--max-new-tokens",
            "8",
            "--no-progress",
            "--reference-column",
            "text",
            "--allowed-prefixes",
            f"{SAMPLES},{web.url}/files/,{web.url}/missing/,{web.url}/away/",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {
        r["id"]: r
        for r in pads.dataset(output / "transcripts", format="parquet", partitioning="hive").to_table().to_pylist()
    }
    assert len(rows) == 12
    assert "audio_bytes" not in next(iter(rows.values())) and "channels" not in next(iter(rows.values()))
    for n in names:
        embedded, url, path = rows[f"embedded-{n}"], rows[f"url-{n}"], rows[f"path-{n}"]
        assert embedded["error"] is None and url["error"] is None and path["error"] is None
        assert embedded["text"] == url["text"] == path["text"] and embedded["text"]
        assert embedded["audio"] == n and url["audio"] == f"{web.url}/files/{n}"
        assert embedded["reference"] == f"reference {ids.index(embedded['id'])}"
    assert rows["missing"]["error"] == f"not found: {web.url}/missing/x.flac"
    assert rows["away"]["error"].startswith("not allowed: ")
    assert rows["split"]["error"] is None and {s["channel"] for s in rows["split"]["segments"]} == {0}
    assert rows["split"]["text"].startswith("[channel 0] ")
    summary = json.loads(next((output / "runs").glob("*.json")).read_text())
    assert summary["rows_ok"] == 10 and summary["rows_failed"] == 2
    assert summary["quality"]["rows_scored"] == 10  # scored against the dataset's own `reference` column


def test_channel_labels_are_not_scored_as_words():
    from granite_batch.evaluate import scorable_rows

    table = pa.table(
        {
            "id": ["a"],
            "task": ["asr"],
            "language": ["en"],
            "target_language": [None],
            "text": ["[channel 0] Hello there.\n[channel 1] Hi."],
            "error": [None],
            "reference": ["hello there hi"],
        }
    )
    rows, _ = scorable_rows(table)
    assert rows[0]["hypothesis_scored"] == rows[0]["reference_scored"] == "hello there hi"


def test_plans_carry_embedded_audio_and_are_sized_by_its_bytes(tmp_path):
    from granite_batch.inputs.plan import BYTES_PER_BUCKET, _buckets_for, plan_bucket, prepare_plan

    layout = prepare_plan(
        ManifestStream(hf_parquet(tmp_path / "m.parquet"), Defaults()),
        OutputRoot(str(tmp_path / "out")),
        str(tmp_path / "plan"),
    )
    todo = pa.concat_tables([plan_bucket(layout, b)[0] for b in range(layout.buckets)])
    by_id = {row["id"]: row["audio_bytes"] for row in todo.to_pylist()}
    assert by_id == {name: (SAMPLES / name).read_bytes() for name in NAMES}
    sizes = [(SAMPLES / name).stat().st_size for name in NAMES]
    assert min(sizes) < layout.bytes_per_row < max(sizes) + 1000
    assert layout.input_block_rows(16) == 16 and _buckets_for(100, 10 * BYTES_PER_BUCKET) == 16
    (tmp_path / "shards").mkdir()
    write_shard(tmp_path / "shards" / "a.tar")
    write_shard(tmp_path / "shards" / "b.tar")
    stream = ManifestStream(str(tmp_path / "shards" / "*.tar"), Defaults(), listing=True)
    assert stream.size_bytes() == sum((tmp_path / "shards" / n).stat().st_size for n in ("a.tar", "b.tar"))
