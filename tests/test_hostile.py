"""Hostile inputs: every broken or odd recording gives exactly one row, and nobody gets out of bounds."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SAMPLES, SPEECH, encode, run_cli, write_jsonl
from granite_batch.audio.decode import DecodeError, load_recording
from granite_batch.inputs.manifest import read_manifest
from granite_batch.inputs.rows import Defaults, ManifestError
from granite_batch.models.prompts import AUDIO_TOKEN, Request, render_prompt
from granite_batch.storage import is_allowed


def wav_claiming_hours(path: Path) -> Path:
    """A WAV header that announces ~6 hours of 48 kHz stereo audio, followed by 1000 bytes."""
    data_size = 0x7FFFFFF0
    header = b"RIFF" + struct.pack("<I", data_size + 36) + b"WAVE"
    header += b"fmt " + struct.pack("<IHHIIHH", 16, 1, 2, 48000, 48000 * 4, 4, 16)
    header += b"data" + struct.pack("<I", data_size)
    path.write_bytes(header + np.random.default_rng(1).integers(-3000, 3000, 500, dtype=np.int16).tobytes())
    return path


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, format_corpus, speech):
    """name -> (path, expectation): "ok", "empty" (ok, no text), "error", or "either"."""
    folder = tmp_path_factory.mktemp("hostile")
    samples, rate = speech
    cases: dict[str, tuple[Path, str]] = {}
    for name in ("speech.mp3", "speech.flac", "speech.opus.ogg"):
        data = format_corpus[name].read_bytes()
        path = folder / f"truncated-{name}"
        path.write_bytes(data[: len(data) * 2 // 5])
        cases[path.name] = (path, "either")
    cases["header-claims-hours.wav"] = (wav_claiming_hours(folder / "header-claims-hours.wav"), "either")
    nan = samples.copy()
    nan[1000:1100] = np.nan
    nan[2000:2100] = np.inf
    nan[3000:3100] = -np.inf
    sf.write(folder / "nan-inf.wav", nan, rate, subtype="FLOAT")
    cases["nan-inf.wav"] = (folder / "nan-inf.wav", "ok")
    sf.write(folder / "one-sample.wav", samples[5000:5001], rate)
    cases["one-sample.wav"] = (folder / "one-sample.wav", "empty")
    sf.write(folder / "50ms.wav", samples[5000 : 5000 + rate // 20], rate)
    cases["50ms.wav"] = (folder / "50ms.wav", "empty")
    sf.write(folder / "8bit.wav", samples, rate, subtype="PCM_U8")
    cases["8bit.wav"] = (folder / "8bit.wav", "ok")
    cases["six-channels.wav"] = (encode(folder / "six-channels.wav", samples, rate, "pcm_s16le", "wav", 6), "ok")
    cases["192k.wav"] = (encode(folder / "192k.wav", samples, rate, "pcm_s24le", "wav", 1, 192000), "ok")
    sf.write(folder / "clipped.wav", np.clip(samples * 50, -1, 1), rate)
    cases["clipped.wav"] = (folder / "clipped.wav", "ok")
    unicode_name = folder / "grabación de prueba ü 日本 #1.flac"
    shutil.copy(SPEECH, unicode_name)
    cases[unicode_name.name] = (unicode_name, "ok")
    return cases


@pytest.fixture(scope="module")
def hostile_job(tmp_path_factory, hostile, tiny_model_dir):
    work = tmp_path_factory.mktemp("hostile-job")
    rows = [{"audio": str(path), "case": name} for name, (path, _) in hostile.items()]
    rows += [
        {"audio": str(SAMPLES / "pt_praia.wav"), "language": "pt", "case": "normal"},
        {"audio": "/etc/passwd", "case": "outside"},
        {"audio": str(SAMPLES / ".." / ".." / "etc" / "hostname"), "case": "escape"},
    ]
    manifest = write_jsonl(work / "m.jsonl", rows)
    allowed = f"{next(iter(hostile.values()))[0].parent},{SAMPLES}"
    result = run_cli(
        [
            "run",
            "--manifest",
            str(manifest),
            "--output",
            str(work / "out"),
            "--model",
            str(tiny_model_dir),
            "--max-new-tokens",
            "6",
            "--no-progress",
            "--allowed-prefixes",
            allowed,
        ]
    )
    table = pads.dataset(work / "out" / "transcripts", format="parquet", partitioning="hive").to_table()
    return result, {row["case"]: row for row in table.to_pylist()}, table.num_rows


def test_every_hostile_case_gives_exactly_one_row_and_the_job_exits_zero(hostile_job, hostile):
    result, rows, count = hostile_job
    assert result.returncode == 0, result.stderr[-3000:]
    assert count == len(hostile) + 3 == len(rows)
    for name, (_, expected) in hostile.items():
        row = rows[name]
        if expected == "ok":
            assert row["error"] is None and row["text"] and row["duration_s"] > 3.0, row
        elif expected == "empty":
            assert row["error"] is None and row["text"] == "" and row["duration_s"] < 0.06, row
        elif row["error"] is not None:
            assert row["error"].startswith("decode failed"), row
            assert row["text"] is None
        else:
            assert isinstance(row["text"], str) and row["duration_s"] < 3.0, row
    assert rows["normal"]["error"] is None and rows["normal"]["text"]


def test_odd_formats_decode_to_the_right_length(hostile_job):
    _, rows, _ = hostile_job
    for name in ("8bit.wav", "six-channels.wav", "192k.wav", "clipped.wav", "nan-inf.wav"):
        assert rows[name]["duration_s"] == pytest.approx(3.4845, abs=0.02), name


def test_recordings_outside_allowed_prefixes_are_refused(hostile_job):
    _, rows, _ = hostile_job
    assert rows["outside"]["error"] == "not allowed: /etc/passwd is outside the allowed prefixes"
    assert rows["escape"]["error"].startswith("not allowed:")


def test_allowed_prefixes_match_whole_components_and_resolve_escapes(tmp_path):
    (tmp_path / "audio").mkdir()
    (tmp_path / "audio-private").mkdir()
    (tmp_path / "audio" / "link").symlink_to(tmp_path / "audio-private")
    prefixes = (str(tmp_path / "audio"),)
    assert is_allowed(str(tmp_path / "audio" / "a.wav"), prefixes)
    assert not is_allowed(str(tmp_path / "audio-private" / "a.wav"), prefixes)
    assert not is_allowed(str(tmp_path / "audio" / ".." / "audio-private" / "a.wav"), prefixes)
    assert not is_allowed(str(tmp_path / "audio" / "link" / "a.wav"), prefixes)  # symlink out
    assert is_allowed("s3://bucket/archive/x.mp3", ("s3://bucket/archive/",))
    assert not is_allowed("s3://bucket/archive/../secret/x.mp3", ("s3://bucket/archive/",))
    assert not is_allowed("s3://bucket/archive-2/x.mp3", ("s3://bucket/archive",))
    assert is_allowed("/anything", ())


def test_decoding_has_a_time_limit():
    with pytest.raises(DecodeError, match="decode timed out"):
        load_recording(str(SPEECH), timeout_s=1e-9)


def test_corrupt_weights_stop_the_job_before_any_work(tmp_path, tiny_model_dir):
    broken = tmp_path / "model"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run_cli(
        [
            "run",
            "--manifest",
            str(SAMPLES / "manifest.jsonl"),
            "--output",
            str(tmp_path / "out"),
            "--model",
            str(broken),
        ]
    )
    assert result.returncode == 3
    assert "corrupt weights in model.safetensors" in result.stderr
    assert not (tmp_path / "out").exists()


def test_nested_and_odd_typed_extra_columns_pass_through(tmp_path):
    rows = [
        {
            "audio": "/a.wav",
            "meta": {"speaker": {"name": "Ana", "age": 40}},
            "tags": ["x", "y"],
            "score": 1.5,
            "flag": True,
            "nothing": None,
        },
        {
            "audio": "/b.wav",
            "meta": {"speaker": {"name": "Bo", "age": None}},
            "tags": [],
            "score": 2,
            "flag": False,
            "nothing": None,
        },
    ]
    table = read_manifest(str(write_jsonl(tmp_path / "m.jsonl", rows)), Defaults()).table
    back = table.to_pylist()
    assert back[0]["meta"] == {"speaker": {"name": "Ana", "age": 40}} and back[1]["tags"] == []
    assert back[1]["score"] == 2 and back[0]["flag"] is True


def test_a_100000_row_manifest(tmp_path):
    path = tmp_path / "big.jsonl"
    with open(path, "w") as handle:
        for i in range(100_000):
            handle.write(json.dumps({"audio": f"/archive/{i % 99_000}.flac", "n": i}) + "\n")
    manifest = read_manifest(str(path), Defaults())
    assert manifest.table.num_rows == 99_000 and manifest.duplicates == 1_000


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=3),
    max_leaves=5,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    rows=st.lists(
        st.fixed_dictionaries(
            {"audio": st.text(min_size=0, max_size=30)},
            optional={
                "language": st.text(max_size=5) | st.sampled_from(["en", "fr", "xx"]),
                "task": st.sampled_from(["asr", "ast", "", "other"]),
                "target_language": st.sampled_from(["en", "fr", "zh", ""]) | st.none(),
                "keywords": st.lists(st.text(max_size=10), max_size=3) | st.text(max_size=20),
                "extra": json_values,
            },
        ),
        min_size=1,
        max_size=8,
    )
)
def test_manifest_parsing_never_fails_in_an_unexpected_way(tmp_path, rows):
    path = write_jsonl(tmp_path / "h.jsonl", rows)
    try:
        manifest = read_manifest(str(path), Defaults())
    except ManifestError as exc:
        assert "h.jsonl" in str(exc)  # a schema error always names the file
        return
    table = manifest.table.to_pylist()
    assert len(table) + manifest.duplicates == len(rows)
    for row in table:
        assert row["audio"] and row["id"]
        assert row["error"] is None or ":" in row["error"]
        assert row["language"] in ("en", "fr", "de", "es", "pt", "ja", "und")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    keywords=st.lists(st.text(max_size=30), max_size=4),
    task=st.sampled_from([("asr", None), ("ast", "en"), ("ast", "fr")]),
)
def test_no_keyword_text_changes_the_prompt_structure(tiny_model_dir, keywords, task):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = render_prompt(tokenizer, Request(task[0], task[1], tuple(keywords)))
    assert prompt.startswith("USER: " + AUDIO_TOKEN) and prompt.endswith("\n ASSISTANT:")
    # One audio placeholder and one line break: keyword text stays inside the user turn, whatever it
    # says (role words without a line break before them do not open a turn in this template).
    assert prompt.count(AUDIO_TOKEN) == 1 and prompt.count("\n") == 1
    ids = tokenizer(prompt)["input_ids"]
    assert ids.count(tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)) == 1


@pytest.mark.parametrize("flag, value", [("--max-segment-s", "nan"), ("--max-duration-s", "inf")])
def test_a_number_that_is_not_finite_is_named_so(tmp_path, flag, value):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"audio": str(SPEECH)}])
    result = run_cli(["run", "--manifest", str(manifest), "--output", str(tmp_path / "out"), flag, value])
    assert result.returncode == 2
    assert "Input should be a finite number" in result.stderr and "greater than" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_a_header_claiming_2_hz_is_the_rows_error_not_hours_of_audio(tmp_path):
    # 2 s of 16 kHz speech whose header says 2 Hz: read at its word, it would be 4.4 hours of audio.
    path = tmp_path / "two-hertz.wav"
    sf.write(path, np.zeros(32000, np.float32), 16000, subtype="PCM_16")
    data = bytearray(path.read_bytes())
    data[24:32] = struct.pack("<II", 2, 4)  # sample rate, byte rate
    path.write_bytes(bytes(data))
    with pytest.raises(DecodeError, match="header claims a sample rate of 2 Hz"):
        load_recording(str(path))
    # A real low rate still decodes, to its true length.
    low = tmp_path / "eight-khz.wav"
    sf.write(low, np.zeros(8000, np.float32), 8000, subtype="PCM_16")
    assert load_recording(str(low)).duration_s == pytest.approx(1.0, abs=0.01)
