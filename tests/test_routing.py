"""Several models in one job: each row goes to the first model that serves it, in one Ray Data pipeline."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.dataset as pads
import pytest

from conftest import SAMPLES, run_cli, write_jsonl
from granite_batch.config import load_config
from granite_batch.inference.routing import ROUTE_COLUMN, RequestFlags, route_table, row_requests, served_request
from granite_batch.models.profiles import GRANITE_SPEECH, GRANITE_SPEECH5_CTC, GRANITE_SPEECH_41, GRANITE_SPEECH_PLUS

SAMPLE_ROWS = [json.loads(line) for line in (SAMPLES / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


def rows_table(rows: list[dict]) -> pa.Table:
    base = {"task": "asr", "target_language": None, "keywords": [], "language": "en", "error": None}
    keys = {key for row in rows for key in row}
    base.update({key: None for key in keys - set(base) - {"id"}})
    return pa.Table.from_pylist([{**base, **row} for row in rows])


def test_route_table_sends_each_row_to_the_first_model_that_serves_it():
    models = [("turbo", GRANITE_SPEECH5_CTC), ("granite", GRANITE_SPEECH), ("plus", GRANITE_SPEECH_PLUS)]
    table = rows_table(
        [
            {"id": "en"},
            {"id": "fr", "language": "fr"},
            {"id": "kw", "keywords": ["Ray"]},
            {"id": "ast", "language": "fr", "task": "ast", "target_language": "en"},
            {"id": "spk", "speakers": True},
            {"id": "ja-spk", "language": "ja", "speakers": True},
            {"id": "done", "error": "decode failed: x"},
        ]
    )
    routed = route_table(table, models, RequestFlags())
    assert routed.column(ROUTE_COLUMN).to_pylist() == [0, 1, 1, 1, 2, 0, 0]
    errors = dict(zip(routed.column("id").to_pylist(), routed.column("error").to_pylist()))
    assert errors["ja-spk"] == (
        "no listed model serves this row: turbo has no ja transcription; "
        "granite has no speaker labels; plus has no ja transcription"
    )
    assert errors["done"] == "decode failed: x"
    assert [e for k, e in errors.items() if k not in ("ja-spk", "done")] == [None] * 5
    # Flags may be strings (a CSV manifest); one that is no boolean is the row's error.
    strings = route_table(
        rows_table([{"id": "yes", "speakers": "Yes"}, {"id": "bad", "speakers": "maybe"}]), models, RequestFlags()
    )
    assert strings.column(ROUTE_COLUMN).to_pylist() == [2, 0]
    assert strings.column("error").to_pylist() == [None, "invalid speakers: 'maybe' (use true or false)"]
    # A branch keeps its own rows only.
    assert route_table(table, models, RequestFlags(), keep=1).column("id").to_pylist() == ["fr", "kw", "ast"]
    # The job's speakers setting routes every row that leaves it unset.
    assert route_table(table.slice(0, 1), models, RequestFlags(speakers=True)).column(ROUTE_COLUMN).to_pylist() == [2]


def test_punctuation_is_on_where_the_model_can_unless_a_row_says_otherwise():
    table = rows_table([{"id": "a"}, {"id": "b", "punctuation": False}, {"id": "c", "punctuation": True}])
    requests, punctuation, errors = row_requests(table, RequestFlags())
    assert punctuation == [None, False, True] and errors == [None] * 3
    assert [served_request(r, p, GRANITE_SPEECH_41).punctuation for r, p in zip(requests, punctuation)] == [
        True,
        False,
        True,
    ]
    assert [served_request(r, p, GRANITE_SPEECH).punctuation for r, p in zip(requests, punctuation)] == [
        False,
        False,
        False,
    ]
    # Explicitly asked for, it routes only to a model that punctuates.
    assert route_table(table, [("granite", GRANITE_SPEECH), ("g41", GRANITE_SPEECH_41)], RequestFlags()).column(
        ROUTE_COLUMN
    ).to_pylist() == [0, 0, 1]
    # The job's `punctuation: false` turns it off everywhere.
    requests, punctuation, _ = row_requests(table.slice(0, 1), RequestFlags(punctuation=False))
    assert served_request(requests[0], punctuation[0], GRANITE_SPEECH_41).punctuation is False


def test_models_and_their_resources_in_the_config(tmp_path):
    config = load_config(
        overrides={
            "manifest": "m.jsonl",
            "output": "out",
            "models": [{"model": "a", "resources": {"gpus_per_actor": 0.5, "model_actors_max": 3}}, {"model": "b"}],
        }
    )
    assert [s.model for s in config.model_specs()] == ["a", "b"]
    first = config.resources_for(config.model_specs()[0])
    assert (first.gpus_per_actor, first.model_actors_max, first.model_actors_min) == (0.5, 3, 1)
    assert config.resources_for(config.model_specs()[1]).gpus_per_actor is None
    with pytest.raises(ValueError, match="unknown resource"):
        load_config(overrides={"manifest": "m", "output": "o", "models": [{"model": "a", "resources": {"gpu": 1}}]})


@pytest.fixture(scope="module")
def routed_job(tmp_path_factory, tiny_model_dir, tiny_ctc_dir, tiny_plus_dir):
    """One run naming three tiny models (CTC first), over the samples and requests only some serve."""
    work = tmp_path_factory.mktemp("routed")
    rows = [dict(row, audio=str(SAMPLES / row["audio"]), id=f"sample-{i}") for i, row in enumerate(SAMPLE_ROWS)]
    en = str(SAMPLES / "en_weather.flac")
    rows += [
        {"id": "speakers", "audio": en, "speakers": True},
        {"id": "ja-speakers", "audio": str(SAMPLES / "ja_tenki.flac"), "language": "ja", "speakers": True},
        {"id": "punctuated", "audio": en, "punctuation": True},
    ]
    manifest = write_jsonl(work / "manifest.jsonl", rows)
    light = {"cpus_per_actor": 0.25}  # three pools on a 2-core machine
    config = work / "job.yaml"
    config.write_text(
        json.dumps(
            {
                "models": [
                    {"model": str(d), "resources": light} for d in (tiny_ctc_dir, tiny_model_dir, tiny_plus_dir)
                ],
                "batch_size": 4,
                # Calls of at most 2 s: the speakers row's 3.5 s are two calls, decoded as one session.
                "max_segment_s": 2.0,
                "generation": {"max_new_tokens": 12},
                "resources": {"decode_cpus": 0.25},
            }
        )
    )
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
            "--no-progress",
            "--run-id",
            "routed",
        ]
    )
    table = pads.dataset(output / "transcripts", format="parquet", partitioning="hive").to_table()
    summary = json.loads((output / "runs" / "routed.json").read_text())
    return {
        "result": result,
        "rows": rows,
        "table": table,
        "summary": summary,
        "dirs": {"ctc": tiny_ctc_dir, "granite": tiny_model_dir, "plus": tiny_plus_dir},
    }


def test_every_row_once_and_served_by_the_right_model(routed_job):
    assert routed_job["result"].returncode == 0, routed_job["result"].stderr[-3000:]
    table = routed_job["table"]
    ids = table.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == len(routed_job["rows"])
    dirs = {name: str(path.resolve()) for name, path in routed_job["dirs"].items()}
    by_id = {row["id"]: row for row in table.to_pylist()}
    keywords = {row["id"]: row.get("keywords") for row in routed_job["rows"]}  # an input, not an output column
    for row in by_id.values():
        if row["id"] in ("ja-speakers", "punctuated"):
            continue
        assert row["error"] is None, row
        english_asr = row["language"] == "en" and row["task"] == "asr"
        if row["id"] == "speakers":
            expected = dirs["plus"]
        elif english_asr and not keywords[row["id"]]:
            expected = dirs["ctc"]
        else:  # translation, keywords and every other language
            expected = dirs["granite"]
        assert row["model"] == expected, row["id"]
    served = {row["model"] for row in by_id.values()}
    assert served == set(dirs.values())
    summary = routed_job["summary"]
    assert [m["model"] for m in summary["models"]] == [dirs["ctc"], dirs["granite"], dirs["plus"]]
    assert set(summary["inference"]) == set(dirs.values())


def test_rows_no_model_serves_get_errors_naming_what_is_missing(routed_job):
    by_id = {row["id"]: row for row in routed_job["table"].to_pylist()}
    assert "has no speaker labels" in by_id["ja-speakers"]["error"]
    assert "has no ja transcription" in by_id["ja-speakers"]["error"]
    assert by_id["punctuated"]["error"].startswith("no listed model serves this row")
    assert "has no punctuation" in by_id["punctuated"]["error"]
    assert by_id["punctuated"]["text"] is None


def test_only_the_speakers_row_can_carry_speakers(routed_job):
    by_id = {row["id"]: row for row in routed_job["table"].to_pylist()}
    assert by_id["speakers"]["segments"]
    for segment in by_id["speakers"]["segments"]:
        assert segment["words"] is None
        assert segment["speaker"] is None or segment["speaker"].startswith("0:")
    # Its calls went to the model as one speaker session (audio/sessions.py): one segment row.
    plus = str(routed_job["dirs"]["plus"].resolve())
    assert routed_job["summary"]["inference"][plus]["segments"] == 1
    for row in by_id.values():
        if row["id"] != "speakers" and row["error"] is None:
            assert all(s["speaker"] is None and s["words"] is None for s in row["segments"])


def test_the_ctc_checkpoint_alone_runs_the_samples_and_refuses_what_it_cannot_serve(tmp_path, tiny_ctc_dir):
    rows = [dict(row, audio=str(SAMPLES / row["audio"]), id=f"sample-{i}") for i, row in enumerate(SAMPLE_ROWS)]
    manifest = write_jsonl(tmp_path / "manifest.jsonl", rows)
    output = tmp_path / "out"
    result = run_cli(
        [
            "run",
            "--manifest",
            str(manifest),
            "--output",
            str(output),
            "--model",
            str(tiny_ctc_dir),
            "--batch-size",
            "4",
            "--no-progress",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = pads.dataset(output / "transcripts", format="parquet", partitioning="hive").to_table()
    by_id = {row["id"]: row for row in table.to_pylist()}
    assert set(by_id) == {row["id"] for row in rows}
    for row in rows:
        out = by_id[row["id"]]
        assert out["model"] == str(tiny_ctc_dir.resolve())
        if row["language"] == "en" and row.get("task", "asr") == "asr" and not row.get("keywords"):
            assert out["error"] is None and out["text"] and out["segments"]
        else:
            assert out["error"].startswith(f"no listed model serves this row: {tiny_ctc_dir} has no "), out["error"]
    reasons = {by_id[r["id"]]["error"].rsplit(" has no ", 1)[1] for r in rows if by_id[r["id"]]["error"]}
    assert reasons == {
        "fr transcription",
        "de transcription",
        "es transcription",
        "pt transcription",
        "ja transcription",
        "translation (ast)",
        "keywords",
    }


def test_rows_lost_to_crashes_are_labelled_with_the_model_they_were_routed_to(
    tiny_model_dir, tiny_ctc_dir, tiny_plus_dir
):
    from granite_batch.pipeline import request_flags
    from granite_batch.run.recovery import crashed_rows
    from granite_batch.run.transcription import resolve_job_models, routed_models

    dirs = [str(d) for d in (tiny_ctc_dir, tiny_model_dir, tiny_plus_dir)]
    config = load_config(overrides={"manifest": "m.jsonl", "output": "out", "models": [{"model": d} for d in dirs]})
    models = resolve_job_models(config)
    refs = [model.ref for model in models]
    lost = rows_table([{"id": "en"}, {"id": "fr", "language": "fr"}, {"id": "spk", "speakers": True}])
    names, revisions = routed_models(lost, models, request_flags(config))
    assert names == [refs[0].name, refs[1].name, refs[2].name] and len(set(names)) == 3
    schema = pa.schema(
        [
            ("id", pa.string()),
            ("error", pa.string()),
            ("text", pa.string()),
            ("model", pa.string()),
            ("model_revision", pa.string()),
            ("run_id", pa.string()),
        ]
    )
    rows = crashed_rows(lost, schema, names, revisions, "R1")
    assert rows.column("model").to_pylist() == names and rows.column("model_revision").to_pylist() == revisions
    one = load_config(overrides={"manifest": "m.jsonl", "output": "out", "model": dirs[1]})
    assert routed_models(lost, resolve_job_models(one), request_flags(one))[0] == [refs[1].name] * 3
