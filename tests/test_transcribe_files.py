"""`granite-batch transcribe FILE...`: the samples to txt, srt, vtt and json, named by each file's stem."""

from __future__ import annotations

import json
import shutil

import pyarrow as pa
import pytest
import srt
import webvtt

from conftest import SAMPLES, run_cli
from granite_batch.cli.transcribe import output_names, render
from granite_batch.schema import SEGMENT_TYPE

FILES = ["en_weather.flac", "fr_gare.mp3", "de_bibliothek.ogg"]


@pytest.fixture(scope="module")
def transcribed(tmp_path_factory, tiny_model_dir):
    """The samples (and one copy whose stem clashes, and one missing file) through `transcribe`."""
    work = tmp_path_factory.mktemp("files")
    clash = work / "other" / "en_weather.wav"
    clash.parent.mkdir()
    shutil.copy(SAMPLES / "de_bibliothek.ogg", clash)  # an ogg under a .wav name: decoded by content
    paths = [str(SAMPLES / name) for name in FILES] + [str(clash), str(work / "missing.wav")]
    out = work / "texts"
    result = run_cli(
        ["transcribe", *paths, "--format", "all", "--output-dir", str(out), "--model", str(tiny_model_dir)]
        + ["--max-new-tokens", "8", "--language", "de"]
    )
    return {"result": result, "out": out, "paths": paths}


def test_every_file_gets_every_format_named_by_its_stem(transcribed):
    result, out = transcribed["result"], transcribed["out"]
    assert result.returncode == 0, result.stderr[-3000:]
    names = sorted(p.name for p in out.iterdir())
    expected = ["fr_gare", "de_bibliothek", "en_weather.flac", "en_weather.wav"]  # the clash takes whole names
    assert names == sorted(f"{stem}.{fmt}" for stem in expected for fmt in ("txt", "srt", "vtt", "json"))
    assert "4 of 5 files transcribed" in result.stdout


def test_progress_is_one_line_in_the_jobs_terms_off_a_terminal(transcribed):
    lines = [line for line in transcribed["result"].stderr.splitlines() if "progress: " in line]
    assert lines and "5 of 5 recordings (100.0%), 1 failed" in lines[-1] and lines[-1].endswith("done")
    assert "Running Dataset" not in transcribed["result"].stderr  # Ray Data's operator bars are off


def test_a_failed_file_is_named_on_stderr_and_writes_nothing(transcribed):
    assert "missing.wav: " in transcribed["result"].stderr
    assert not list(transcribed["out"].glob("missing*"))


def test_the_files_agree_with_each_other(transcribed):
    out = transcribed["out"]
    row = json.loads((out / "fr_gare.json").read_text(encoding="utf-8"))
    assert row["error"] is None and row["language"] == "de"  # --language is run's own flag
    assert (out / "fr_gare.txt").read_text(encoding="utf-8") == row["text"] + "\n"
    cues = list(srt.parse((out / "fr_gare.srt").read_text(encoding="utf-8")))
    spoken = [s for s in row["segments"] if s["text"].strip()]
    assert len(cues) >= len(spoken) > 0
    vtt = webvtt.from_string((out / "fr_gare.vtt").read_text(encoding="utf-8"))
    assert [c.text for c in vtt] == [c.content for c in cues]


def test_the_same_content_under_two_names_gives_the_same_text(transcribed):
    out = transcribed["out"]
    assert (out / "en_weather.wav.txt").read_text() == (out / "de_bibliothek.txt").read_text()


def test_output_names_for_clashing_stems():
    files = ["a/talk.wav", "b/talk.mp3", "c/talk.wav", "s3://bucket/x/intro.flac"]
    assert output_names(files) == ["talk.wav", "talk.mp3", "talk.wav-2", "intro"]


def test_render_txt_and_json():
    segments = pa.array([[{"start": 0.0, "end": 1.0, "text": "Hi."}]], pa.list_(SEGMENT_TYPE)).to_pylist()[0]
    row = {"text": "Hi.", "segments": segments, "error": None, "audio": "a.wav"}
    assert render(row, "txt") == "Hi.\n"
    assert json.loads(render(row, "json"))["segments"][0]["text"] == "Hi."
    assert render(row, "srt").startswith("1\n00:00:00,000 --> 00:00:01,000\nHi.")
