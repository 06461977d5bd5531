"""Segments are the unit of model work: mixed batches equal one-at-a-time output, recordings are
assembled whole from segments arriving in any order, and the inference figures add up."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa
import pytest

from conftest import SAMPLES
from granite_batch import schema
from granite_batch.audio.decode import load_recording, samples_to_arrow
from granite_batch.inference.assemble import RecordingAssembler
from granite_batch.inference.routing import RequestFlags
from granite_batch.inference.transcribe import transcribe_segments
from granite_batch.models.model import SpeechModel
from granite_batch.models.prompts import Request
from granite_batch.schema import END, SEGMENT, SEGMENT_TYPE

RATE = 16000
NAMES = ["en_weather.flac", "fr_gare.mp3", "ja_tenki.flac", "pt_praia.wav", "de_bibliothek.ogg"]


@pytest.fixture(scope="module")
def clips():
    return [load_recording(str(SAMPLES / name)).samples for name in NAMES]


def model(tiny_model_dir, **options) -> SpeechModel:
    return SpeechModel.load(str(tiny_model_dir), max_new_tokens=None, max_new_tokens_per_audio_s=3.0, **options)


def segment_rows(recordings: list[dict]) -> pa.Table:
    """Segment rows as segment.segment_table makes them, for recordings given as dicts with
    `id`, `language`, `task`, `target_language`, `keywords`, `error` and `pieces` (sample arrays)."""
    rows, samples, segments = [], [], []
    for rec in recordings:
        pieces = rec["pieces"]
        start = 0.0
        for k, piece in enumerate(pieces or [None]):
            length = 0 if piece is None else len(piece) / RATE
            rows.append(
                {
                    "id": rec["id"],
                    "audio": f"{rec['id']}.flac",
                    "language": rec.get("language", "en"),
                    "task": rec.get("task", "asr"),
                    "target_language": rec.get("target_language"),
                    "keywords": list(rec.get("keywords", [])),
                    "error": rec.get("error"),
                    "duration_s": 60.0,
                    "reference": rec.get("reference"),
                }
            )
            segments.append((SEGMENT, k, start, start + length) if pieces else (END, None, None, None))
            samples.append(piece)
            start += length + 1.0
    recording = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [
                ("id", pa.string()),
                ("audio", pa.string()),
                ("language", pa.string()),
                ("task", pa.string()),
                ("target_language", pa.string()),
                ("keywords", pa.list_(pa.string())),
                ("error", pa.string()),
                ("duration_s", pa.float64()),
                ("reference", pa.string()),
            ]
        ),
    )
    counts = {rec["id"]: len(rec["pieces"]) for rec in recordings}
    return schema.segment_rows(
        recording,
        samples_to_arrow(samples),
        row_kind=[kind for kind, _, _, _ in segments],
        segment_index=[k for _, k, _, _ in segments],
        segment_count=[counts[row["id"]] for row in rows],
        start_s=[start for _, _, start, _ in segments],
        end_s=[end for _, _, _, end in segments],
    )


def test_a_batch_mixing_recordings_and_requests_equals_one_segment_at_a_time(tiny_model_dir, clips):
    speech_model = model(tiny_model_dir, max_batch_segments=3)
    recordings = [
        {"id": "a", "pieces": [clips[0], clips[1][: 2 * RATE]]},
        {"id": "b", "task": "ast", "target_language": "fr", "pieces": [clips[3]]},
        {"id": "c", "keywords": ["praia", "Lisboa"], "pieces": [clips[4], clips[2], clips[0][: 3 * RATE]]},
        {"id": "d", "language": "ja", "pieces": [clips[2]]},
    ]
    table = segment_rows(recordings)
    batched = transcribe_segments(table, speech_model)
    alone = [transcribe_segments(table.slice(i, 1), speech_model) for i in range(table.num_rows)]
    assert batched.column("segment_text").to_pylist() == [t.column("segment_text")[0].as_py() for t in alone]
    assert "samples" not in batched.column_names
    texts = batched.column("segment_text").to_pylist()
    assert len(set(texts)) >= 4  # informative: the random model's output depends on the audio
    # 7 segments in calls of at most 3: three calls, each counted once.
    assert sum(batched.column("first_of_call").to_pylist()) == 3
    # The tiny model never stops on its own: every segment ran to its budget, 16 + 3 per audio second.
    for row in batched.to_pylist():
        assert row["segment_truncated"] is True
        assert row["new_tokens"] == 16 + int(np.ceil(3.0 * (row["end_s"] - row["start_s"]) - 1e-9))
        assert 0 <= row["lm_padded_positions"] < row["lm_positions"]


def test_recordings_are_assembled_whole_from_segments_in_any_order(tiny_model_dir, clips):
    speech_model = model(tiny_model_dir, max_batch_segments=4)
    # "long" has more segments than several model batches hold; the others cover every kind of row.
    pieces = [clips[i % 5][: (2 + i % 4) * RATE] for i in range(11)]
    recordings = [
        {"id": "long", "pieces": pieces, "reference": "r"},
        {"id": "ja", "language": "ja", "pieces": [clips[2], clips[2][: 2 * RATE]]},
        {"id": "silent", "pieces": []},
        {"id": "failed", "pieces": [], "error": "decode failed: no audio stream in container mp4"},
    ]
    table = segment_rows(recordings)
    results = transcribe_segments(table, speech_model)
    expected_long = " ".join(
        t
        for t in results.filter(pa.compute.equal(results.column("id"), "long")).column("segment_text").to_pylist()
        if t
    )

    order = list(range(results.num_rows))
    random.Random(7).shuffle(order)
    assembler = RecordingAssembler()
    written = []
    for start in range(0, len(order), 3):  # batches of 3 rows, interleaved across recordings
        rows = assembler.add(results.take(order[start : start + 3]))
        if rows is not None:
            written.extend(rows.to_pylist())
            # A recording is returned only once all its segments are in.
            for row in rows.to_pylist():
                assert not [i for i in order[start + 3 :] if results.column("id")[i].as_py() == row["id"]]
    assert assembler.pending == 0
    by_id = {row["id"]: row for row in written}
    assert sorted(by_id) == ["failed", "ja", "long", "silent"] and len(written) == 4

    long = by_id["long"]
    assert long["text"] == expected_long and long["reference"] == "r"
    assert [s["start"] for s in long["segments"]] == sorted(s["start"] for s in long["segments"])
    assert len(long["segments"]) == 11 and all(s["truncated"] for s in long["segments"])
    assert set(long["segments"][0]) == set(SEGMENT_TYPE.names)
    ja_texts = results.filter(pa.compute.equal(results.column("id"), "ja")).column("segment_text").to_pylist()
    assert by_id["ja"]["text"] == "".join(t for t in ja_texts if t)  # Japanese joins without spaces
    assert (by_id["silent"]["text"], by_id["silent"]["segments"], by_id["silent"]["error"]) == ("", [], None)
    assert by_id["failed"]["text"] is None and by_id["failed"]["error"].startswith("decode failed")

    stats = assembler.inference[""].summary()  # no model column in these rows
    assert stats["segments"] == 13 and stats["truncated_segments"] == 13
    assert stats["generate_calls"] == sum(bool(f) for f in results.column("first_of_call").to_pylist())
    assert stats["mean_segments_per_call"] == pytest.approx(13 / stats["generate_calls"], abs=0.01)
    assert stats["new_tokens"] == sum(n for n in results.column("new_tokens").to_pylist() if n is not None)
    assert 0 < stats["padding_fraction"] < 1


def test_a_segment_delivered_twice_is_counted_once(tiny_model_dir, clips):
    results = transcribe_segments(segment_rows([{"id": "a", "pieces": [clips[0], clips[1]]}]), model(tiny_model_dir))
    assembler = RecordingAssembler()
    assert assembler.add(results.slice(0, 1)) is None
    assert assembler.add(results.slice(0, 1)) is None  # a retried task's output seen again
    rows = assembler.add(results.slice(1, 1)).to_pylist()
    assert len(rows) == 1 and len(rows[0]["segments"]) == 2


def cut_as_decoded(table: pa.Table, ids: set[str], error: str | None = None) -> pa.Table:
    """`table`'s segment rows of `ids` as decode_cut.decode_blocks sends a long recording's: no segment
    count and no duration on each, then one END row with the count, the duration and `error`."""
    keys = table.column("id").to_pylist()
    chosen = [key in ids for key in keys]
    for name, kind in (("segment_count", pa.int32()), ("duration_s", pa.float64())):
        table = table.set_column(
            table.schema.get_field_index(name),
            table.schema.field(name),
            pa.array([None if c else v for c, v in zip(chosen, table.column(name).to_pylist())], kind),
        )
    ends = [
        {
            **table.slice(keys.index(key), 1).to_pylist()[0],
            "row_kind": END,
            "segment_index": None,
            "start_s": None,
            "end_s": None,
            "samples": None,
            "duration_s": 3600.0,
            "segment_count": keys.count(key),
            "error": error,
        }
        for key in sorted(ids)
    ]
    return pa.concat_tables([table, pa.Table.from_pylist(ends, schema=table.schema)])


@pytest.mark.parametrize("error", [None, "too long: more than 7200 s of audio (raise max_duration_s to allow it)"])
def test_a_long_recording_s_end_row_completes_it_with_its_count_and_duration(tiny_model_dir, clips, error):
    rows = cut_as_decoded(
        segment_rows([{"id": "long", "pieces": [clips[0], clips[1], clips[3]]}, {"id": "short", "pieces": [clips[4]]}]),
        {"long"},
        error,
    )
    results = transcribe_segments(rows, model(tiny_model_dir))
    order = [4, 0, 3, 2, 1]  # the end row first: the recording still waits for its segments
    assert results.column("segment_index").to_pylist()[4] is None
    assembler = RecordingAssembler()
    written = {}
    for i in order:
        out = assembler.add(results.slice(i, 1))
        for row in out.to_pylist() if out is not None else []:
            written[row["id"]] = (i, row)
    assert assembler.pending == 0 and written["long"][0] == 1  # complete when its last segment came
    long = written["long"][1]
    assert long["duration_s"] == 3600.0 and long["error"] == error  # from the end row
    if error is None:
        assert len(long["segments"]) == 3 and long["text"] == " ".join(
            t for t in results.column("segment_text").to_pylist()[:3] if t
        )
    else:
        assert long["text"] is None and long["segments"] == []
    assert written["short"][1]["duration_s"] == 60.0 and len(written["short"][1]["segments"]) == 1


def test_a_segment_that_fails_fails_its_recording_alone(tiny_model_dir, clips):
    speech_model = model(tiny_model_dir)
    table = segment_rows(
        [{"id": "good", "pieces": [clips[0]]}, {"id": "bad", "pieces": [clips[1], np.full(RATE, np.nan, np.float32)]}]
    )
    original = speech_model.generate_segments

    def fails_on_nan(items):
        if any(np.isnan(samples).any() for samples, _ in items):
            raise RuntimeError("NaN in the audio")
        return original(items)

    speech_model.generate_segments = fails_on_nan
    results = transcribe_segments(table, speech_model)
    rows = RecordingAssembler().add(results).to_pylist()
    by_id = {row["id"]: row for row in rows}
    assert by_id["good"]["error"] is None and by_id["good"]["text"]
    assert by_id["bad"]["error"] == "inference failed: RuntimeError: NaN in the audio"
    assert by_id["bad"]["text"] is None


def test_requests_of_one_recording_apply_to_all_its_segments(tiny_model_dir, clips):
    speech_model = model(tiny_model_dir)
    table = segment_rows([{"id": "t", "task": "ast", "target_language": "de", "pieces": [clips[0], clips[3]]}])
    results = transcribe_segments(table, speech_model).column("segment_text").to_pylist()
    direct = speech_model.generate([(clips[0], Request("ast", "de")), (clips[3], Request("ast", "de"))])
    assert results == direct


def test_word_timestamps_fill_words_and_confidence_of_assembled_segments(tiny_model_dir, clips):
    speech_model = model(tiny_model_dir)
    table = segment_rows(
        [
            {"id": "en", "pieces": [clips[0], clips[3][: 2 * RATE]]},
            {"id": "ja", "language": "ja", "pieces": [clips[2]]},
            {"id": "fr-en", "task": "ast", "language": "fr", "target_language": "en", "pieces": [clips[1]]},
        ]
    )
    plain = transcribe_segments(table, speech_model)
    timed = transcribe_segments(table, speech_model, RequestFlags(word_timestamps=True))
    assert timed.column("segment_text").to_pylist() == plain.column("segment_text").to_pylist()
    assert plain.column("segment_words").null_count == plain.num_rows
    assembler = RecordingAssembler()
    rows = {row["id"]: row for row in assembler.add(timed).to_pylist()}
    for key in ("en", "ja"):
        for segment in rows[key]["segments"]:
            words = segment["words"]
            assert words and "".join(w["text"] for w in words) == "".join(segment["text"].split())
            assert all(segment["start"] <= w["start"] < w["end"] <= segment["end"] for w in words)
            assert all(a["start"] <= b["start"] for a, b in zip(words, words[1:]))
    assert rows["fr-en"]["segments"][0]["words"] is None  # a translation's words were never spoken
    logprobs = [s["avg_logprob"] for row in rows.values() for s in row["segments"]]
    assert all(value is not None and value < 0 for value in logprobs)
    stats = assembler.inference[""].summary()
    # The random tiny model is unsure of everything it says.
    assert stats["low_confidence_segments"] == 4 and stats["low_confidence_fraction"] == 1.0


def test_words_an_engine_times_itself_are_kept_and_placed_in_the_recording(tiny_model_dir, clips):
    """A CTC engine's words from its greedy path (here the tiny checkpoint's own CTC head read as one)
    replace alignment, shifted from the segment's start to the recording's."""
    from dataclasses import replace

    from granite_batch.models.alignment import words_from_ctc_path

    speech_model = model(tiny_model_dir)
    original = speech_model.generate_segments
    pieces = [chr(c) for c in range(16)]  # the tiny head's 16 classes; "\t" to "\r" are spaces

    def with_path_words(items, **options):
        results = original(items, posteriors=True)
        return [
            replace(r, words=words_from_ctc_path(r.ctc_log_probs.argmax(-1).tolist(), pieces, r.frame_s))
            for r in results
        ]

    speech_model.generate_segments = with_path_words
    table = segment_rows([{"id": "a", "pieces": [clips[0], clips[3]]}])
    timed = transcribe_segments(table, speech_model, RequestFlags(word_timestamps=True))
    for row in timed.to_pylist():
        words = row["segment_words"]
        assert words and all(row["start_s"] <= w["start"] < w["end"] <= row["end_s"] for w in words)
    second = timed.to_pylist()[1]
    assert second["start_s"] > 0 and second["segment_words"][0]["start"] >= second["start_s"]
