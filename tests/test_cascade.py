"""A cascade: a CTC model first, and the segments it decodes poorly decoded again by granite_speech."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pyarrow.compute as pc
import pyarrow.dataset as pads
import pytest

from conftest import REPO, SAMPLES, run_cli, write_jsonl
from granite_batch.audio.decode import load_recording
from granite_batch.cli.run import _print_cascade
from granite_batch.config import ConfigError, ModelSpec, load_config
from granite_batch.inference.assemble import RecordingAssembler
from granite_batch.inference.escalation import BELOW_CONFIDENCE, Cascade, cascade_flags, escalation_pairs, pool_models
from granite_batch.inference.routing import RequestFlags
from granite_batch.inference.transcribe import transcribe_segments
from granite_batch.models.engines import model_profile
from granite_batch.models.hub import ModelRef
from granite_batch.pipeline import Escalator, JobModel, Transcriber
from granite_batch.run.recovery import CRASH_REASON
from test_transcribe import RATE, segment_rows

OPTIONS = {"device": "cpu", "max_new_tokens": None, "max_new_tokens_per_audio_s": 3.0, "max_batch_segments": 4}


def job_model(directory, **escalation) -> JobModel:
    name = str(directory)
    return JobModel(ModelSpec(model=name, **escalation), ModelRef(name, None), model_profile(name))


@pytest.fixture(scope="module")
def english_segments():
    """Segment rows of two English recordings, one of them cut in three, as the segment stage makes them."""
    clips = [load_recording(str(SAMPLES / name)).samples for name in ("en_weather.flac", "pt_praia.wav")]
    return segment_rows(
        [
            {"id": "weather", "pieces": [clips[0][: 2 * RATE]]},
            {"id": "three", "pieces": [clips[1][:RATE], clips[0][RATE : 2 * RATE], clips[1][RATE : 3 * RATE]]},
        ]
    )


def cascade_stages(tiny_ctc_dir, tiny_model_dir, below: float):
    """The two model actors of a job [CTC (escalate_below), granite], run as plain objects (no Ray)."""
    models = [job_model(tiny_ctc_dir, escalate_below=below), job_model(tiny_model_dir)]
    routes = [(m.spec.model, m.profile) for m in models]
    flags = RequestFlags()
    first = Transcriber(models[0], OPTIONS, flags, "run", cascade=Cascade(routes, 0, below, []))
    second = Escalator(models[1], 1, OPTIONS, cascade_flags(flags, models[0].profile), last=True)
    return models, first, second


def by_segment(table) -> dict:
    return {
        (row["id"], row["segment_index"]): row
        for row in table.to_pylist()
        if row["row_kind"] == "segment"  # END rows carry no segment
    }


def test_a_threshold_above_every_confidence_escalates_every_segment_to_the_second_models_own_output(
    tiny_ctc_dir, tiny_model_dir, english_segments
):
    models, first, second = cascade_stages(tiny_ctc_dir, tiny_model_dir, below=0.0)
    marked = first(english_segments)
    # Every CTC segment had a confidence (a mean log-probability, so below 0) and goes on.
    assert all(lp is not None and lp < 0 for lp in marked.column("segment_avg_logprob").to_pylist())
    assert marked.column("escalate_to").to_pylist() == [1] * english_segments.num_rows
    out = second(marked)
    assert "samples" not in out.column_names
    # The second model's own output on the same segments, asked as the cascade asks it (no punctuation,
    # as the CTC model makes none).
    own = transcribe_segments(english_segments, second.speech_model, cascade_flags(RequestFlags(), models[0].profile))
    own_texts = {key: row["segment_text"] for key, row in by_segment(own).items()}
    results = by_segment(out)
    assert set(results) == set(own_texts)
    ctc_name, granite_name = models[0].ref.name, models[1].ref.name
    for key, row in results.items():
        assert row["segment_text"] == own_texts[key], key
        assert row["segment_model"] == granite_name and row["model"] == ctc_name
        assert row["segment_quality"]["escalated_from"] == ctc_name
        assert row["segment_quality"]["escalated_for"] == [BELOW_CONFIDENCE]
    assembler = RecordingAssembler()
    rows = {row["id"]: row for row in assembler.add(out).to_pylist()}
    assert set(rows) == {"weather", "three"} and assembler.pending == 0
    assert [s["text"] for s in rows["three"]["segments"]] == [own_texts[("three", k)] for k in range(3)]
    assert [s["start"] for s in rows["three"]["segments"]] == sorted(s["start"] for s in rows["three"]["segments"])
    assert rows["three"]["model"] == ctc_name  # the row stays the model it was routed to
    assert {s["model"] for row in rows.values() for s in row["segments"]} == {granite_name}
    pairs = assembler.cascade()
    assert [(p["from"], p["to"], p["segments"], p["why"]) for p in pairs] == [
        (ctc_name, granite_name, 4, {BELOW_CONFIDENCE: 4})
    ]
    # The CTC model decoded all of it; granite decoded the same seconds again.
    figures = assembler.inference
    assert figures[ctc_name].audio_s == pytest.approx(figures[granite_name].audio_s)
    assert figures[granite_name].audio_s == pytest.approx(pairs[0]["audio_s"], abs=1e-3)


def test_a_threshold_below_every_confidence_escalates_nothing_and_keeps_the_first_models_output(
    tiny_ctc_dir, tiny_model_dir, english_segments
):
    models, first, second = cascade_stages(tiny_ctc_dir, tiny_model_dir, below=-1e9)
    marked = first(english_segments)
    assert marked.column("escalate_to").null_count == english_segments.num_rows
    assert pc.all(pc.is_null(marked.column("samples"))).as_py()  # nothing held for the second model
    out = second(marked)
    own = transcribe_segments(english_segments, first.speech_model)
    assert {k: r["segment_text"] for k, r in by_segment(out).items()} == {
        k: r["segment_text"] for k, r in by_segment(own).items()
    }
    assert set(out.column("segment_model").to_pylist()) == {models[0].ref.name}
    assembler = RecordingAssembler()
    assembler.add(out)
    assert assembler.cascade() == []


def test_escalation_flags_and_the_cli_form(tmp_path, tiny_ctc_dir, tiny_model_dir):
    # Punctuation left unset follows the first model; a job that asks for it keeps asking.
    ctc = model_profile(str(tiny_ctc_dir))
    assert cascade_flags(RequestFlags(), ctc).punctuation is ctc.punctuation is False
    assert cascade_flags(RequestFlags(punctuation=True), ctc).punctuation is True
    models = [job_model(tiny_ctc_dir, escalate_on=["repetition", "truncated"]), job_model(tiny_model_dir)]
    assert escalation_pairs(models) == [(0, 1)]
    # Granite serves all the CTC model serves: no row could go on past it, so no stage for a third model.
    assert escalation_pairs(models + [job_model(tiny_model_dir)]) == [(0, 1)]
    assert [m.ref.name for m in pool_models(models)] == [str(tiny_ctc_dir), str(tiny_model_dir), str(tiny_model_dir)]
    base = {"manifest": "m.jsonl", "output": str(tmp_path)}
    with pytest.raises(ConfigError, match="no model follows it"):
        load_config(None, {**base, "models": [{"model": "a"}, {"model": "b", "escalate_below": -0.5}]})
    with pytest.raises(ConfigError, match="escalate_on"):
        load_config(None, {**base, "models": [{"model": "a", "escalate_on": ["music"]}, {"model": "b"}]})
    result = run_cli(["run", "--manifest", "m.jsonl", "--output", str(tmp_path), "--escalate-below", "-0.5"])
    assert result.returncode != 0 and "need two --model" in result.stderr


def test_the_printed_summary_says_what_share_of_the_audio_the_second_model_decoded(capsys):
    pair = {"from": "ctc", "to": "llm", "segments": 3, "audio_s": 12.5, "why": {"confidence": 2, "rate": 1}}
    _print_cascade(pair, {"ctc": {"audio_s": 250.0}, "llm": {"audio_s": 40.0}})
    printed = capsys.readouterr().out
    assert "cascade ctc -> llm: 3 segments escalated (confidence 2, rate 1)" in printed
    assert "llm decoded 12.5 s (5.0%) of the 250.0 s it would have decoded without ctc" in printed


def test_a_cascade_job_keeps_one_row_per_id_with_word_times_and_subtitles_also_when_the_second_model_dies(
    tmp_path, tiny_ctc_dir, tiny_model_dir
):
    poison = shutil.copy(SAMPLES / "en_weather.flac", tmp_path / "en_poison.flac")
    rows = [
        {"id": "en", "audio": str(SAMPLES / "en_weather.flac")},
        {"id": "en-too", "audio": str(SAMPLES / "pt_praia.wav")},  # English by the manifest: the CTC model's
        {"id": "fr", "audio": str(SAMPLES / "fr_gare.mp3"), "language": "fr"},
        {"id": "poison", "audio": str(poison)},
    ]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    light = {"cpus_per_actor": 0.25}  # three pools on a 2-core machine
    config = tmp_path / "job.yaml"
    config.write_text(
        json.dumps(
            {
                "models": [
                    {
                        "model": str(tiny_ctc_dir),
                        "resources": light,
                        "escalate_on": ["truncated"],
                        "escalate_below": 0.0,
                    },
                    {"model": str(tiny_model_dir), "resources": light},
                ],
                "batch_size": 4,
                "generation": {"max_new_tokens": 8},
                "resources": {"decode_cpus": 0.25},
                "word_timestamps": True,
                "subtitles": ["vtt"],
            }
        )
    )
    output = tmp_path / "out"
    # The escalation stage's actor dies on the poison row, every time (also alone): a test's own driver.
    driver = (
        "import sys\n"
        "from granite_batch.audio.isolation import CrashTest\n"
        "from granite_batch.config import load_config\n"
        "from granite_batch.run.transcription import run_job\n"
        "config = load_config(sys.argv[1], {'manifest': sys.argv[2], 'output': sys.argv[3], 'run_id': 'first'})\n"
        "run_job(config, progress=False, crash_test=CrashTest(escalation=sys.argv[4]))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", driver, str(config), str(manifest), str(output), str(poison)],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = pads.dataset(output / "transcripts", format="parquet", partitioning="hive").to_table()
    by_id = {row["id"]: row for row in table.to_pylist()}
    assert sorted(table.column("id").to_pylist()) == ["en", "en-too", "fr", "poison"]
    assert by_id["poison"]["error"] == CRASH_REASON and by_id["poison"]["text"] is None
    ctc, granite = str(tiny_ctc_dir.resolve()), str(tiny_model_dir.resolve())
    for row_id in ("en", "en-too"):
        row = by_id[row_id]
        assert row["error"] is None and row["model"] == ctc and row["segments"], row
        for segment in row["segments"]:
            assert segment["model"] == granite and segment["quality"]["escalated_from"] == ctc
            assert BELOW_CONFIDENCE in segment["quality"]["escalated_for"]
            assert segment["words"] is not None  # word times from the model that made the segment
            assert 0.0 <= segment["quality"]["speech_ratio"] <= 1.0  # from the CTC head the word times use
        assert (output / "subtitles" / "vtt").exists()
    assert by_id["fr"]["model"] == granite and by_id["fr"]["error"] is None
    assert all(s["model"] == granite and s["quality"]["escalated_from"] is None for s in by_id["fr"]["segments"])
    summary = json.loads((output / "runs" / "first.json").read_text())
    escalated = sum(len(by_id[i]["segments"]) for i in ("en", "en-too"))
    assert [(p["from"], p["to"], p["segments"]) for p in summary["cascade"]] == [(ctc, granite, escalated)]
    assert summary["inference"][ctc]["audio_s"] >= summary["cascade"][0]["audio_s"] > 0
