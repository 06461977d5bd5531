"""Long recordings are decoded and cut in one helper process: the worker gets their segments, never them."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import soundfile as sf

from conftest import SAMPLES
from granite_batch.audio import decode_cut, segment, stream_cut
from granite_batch.audio.decode import decode_table, load_recording
from granite_batch.audio.isolation import CrashTest
from granite_batch.audio.sessions import Sessions
from granite_batch.audio.vad import VadOptions
from granite_batch.schema import END, SEGMENT, WHOLE

RATE = 16000
# Recordings of at least 4 x 16 s are "long" here (64 s; 1,024 s with the job's options), so a test
# recording of a few minutes takes the long path with several groups of VAD windows.
OPTIONS = VadOptions(batch_windows=4)


@pytest.fixture(scope="module")
def recordings(tmp_path_factory) -> dict[str, str]:
    """Files by kind: long (3 min of speech and pauses), stereo long (split), short, silent long, broken."""
    folder = tmp_path_factory.mktemp("cut")
    speech = np.concatenate([load_recording(str(p)).samples for p in sorted(SAMPLES.glob("*.flac"))])
    rng = np.random.default_rng(3)
    parts = []
    while sum(len(p) for p in parts) < 180 * RATE:
        piece = np.roll(speech, -int(rng.integers(0, len(speech))))
        parts += [
            np.resize(piece, int(rng.uniform(2, 12) * RATE)),
            np.zeros(int(rng.uniform(0.2, 4) * RATE), np.float32),
        ]
    long = np.concatenate(parts)
    paths = {
        "long": folder / "long.flac",
        "stereo": folder / "stereo.flac",
        "short": folder / "short.flac",
        "silent": folder / "silent.flac",
        "broken": folder / "broken.flac",
    }
    sf.write(paths["long"], long, RATE)
    paths["ten"] = folder / "ten.flac"  # ten minutes: many groups of windows
    sf.write(paths["ten"], np.concatenate([np.roll(long, -k * 7 * RATE) for k in range(4)])[: 600 * RATE], RATE)
    sf.write(paths["stereo"], np.stack([long[: 100 * RATE], np.roll(long, 7 * RATE)[: 100 * RATE]], axis=1), RATE)
    sf.write(paths["short"], long[: 20 * RATE], RATE)
    sf.write(paths["silent"], np.zeros(90 * RATE, np.float32), RATE)
    paths["broken"].write_bytes(b"not audio at all" * 100)
    return {kind: str(path) for kind, path in paths.items()}


def manifest(recordings: dict[str, str], kinds: list[str]) -> pa.Table:
    return pa.table(
        {
            "id": kinds,
            "audio": [recordings[k] for k in kinds],
            "error": pa.nulls(len(kinds), pa.string()),
            "channels": ["split" if k == "stereo" else "mix" for k in kinds],
        }
    )


def rows(tables) -> list[dict]:
    table = pa.concat_tables(list(tables))
    return sorted(table.to_pylist(), key=lambda r: (r["id"], -1 if r["segment_index"] is None else r["segment_index"]))


def recordings_of(rows: list[dict]) -> dict[str, dict]:
    """What the driver makes of segment rows (transcribe.RecordingAssembler): per id, its segments
    by index, its segment count, duration and error, whichever rows carried them."""
    out: dict[str, dict] = {}
    for r in rows:
        recording = out.setdefault(r["id"], {"segments": {}, "count": None, "duration_s": None, "error": None})
        if r["row_kind"] == SEGMENT:
            assert r["segment_index"] not in recording["segments"]
            recording["segments"][r["segment_index"]] = (r["start_s"], r["end_s"], r["channel"], r["samples"])
        if r["segment_count"] is not None:  # null: a long recording's segment, its END row has it
            assert recording["count"] in (None, r["segment_count"])
            recording["count"], recording["duration_s"] = r["segment_count"], r["duration_s"]
        recording["error"] = recording["error"] or r["error"]
    return out


KINDS = ["short", "long", "broken", "silent", "stereo"]


@pytest.mark.parametrize("isolate", [True, False], ids=["helper", "in-process"])
def test_cut_where_decoded_gives_the_rows_of_decoding_then_segmenting(recordings, isolate):
    table = manifest(recordings, KINDS)
    before = rows(segment.segment_blocks(decode_table(table, isolate=False), RATE, 30.0, OPTIONS, isolate=False))
    blocks = list(decode_cut.decode_blocks(table, 30.0, isolate=isolate, options=OPTIONS, block_bytes=2 << 20))
    after = rows(
        table for block in blocks for table in segment.segment_blocks(block, RATE, 30.0, OPTIONS, isolate=False)
    )
    assert recordings_of(after) == recordings_of(before)
    counts = {key: r["count"] for key, r in recordings_of(after).items()}
    assert all(len(r["segments"]) == r["count"] for r in recordings_of(after).values())
    assert counts["long"] > 6 and counts["stereo"] > 4 and counts["silent"] == 0 and counts["short"] >= 1
    assert [r["error"] is not None for r in after if r["id"] == "broken"] == [True]
    # The long recordings' segments came in tables of about 2 MB of samples, never the recording;
    # the last table has every row once: the short, silent and broken ones, and the end rows of the
    # long ones (their segment counts, no samples).
    cut = blocks[:-1]
    assert len(cut) >= 4 and set(pc.unique(pa.concat_tables(cut).column("id")).to_pylist()) == {"long", "stereo"}
    assert all(block.column("samples").nbytes < (2 << 20) + 30 * RATE * 4 + 4096 for block in cut)
    assert set(pa.concat_tables(cut).column("row_kind").to_pylist()) == {SEGMENT}
    assert set(pa.concat_tables(cut).column("segment_count").to_pylist()) == {None}  # the END rows have them
    last = {
        r["id"]: (r["row_kind"], r["segment_count"])
        for r in blocks[-1].select(["id", "row_kind", "segment_count"]).to_pylist()
    }
    assert last == {
        "short": (WHOLE, None),
        "long": (END, counts["long"]),
        "broken": (WHOLE, None),
        "silent": (END, 0),
        "stereo": (END, counts["stereo"]),
    }


def test_a_long_recording_is_cut_as_it_is_decoded_without_being_held(recordings):
    table = manifest(recordings, ["ten"])
    # Warm up first: the modules the path imports and the VAD it loads on first use are not what this
    # measures (run alone, the test counted 60 MB of imports as held samples).
    list(decode_cut.decode_blocks(manifest(recordings, ["long"]), 30.0, isolate=False, options=OPTIONS))
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        blocks = [
            (block.num_rows, block.column("samples").nbytes)
            for block in decode_cut.decode_blocks(table, 30.0, isolate=False, options=OPTIONS, block_bytes=1 << 20)
        ]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    samples_bytes = 600 * RATE * 4  # 38 MB
    # Held at most: the first 64 s (before it is known to be long), a group of windows (4 x 16.5 s),
    # the speech not yet final (up to 35 s after the last final segment) and what is being cut and
    # sent: about 15 MB, whatever the length.
    assert sum(size for _, size in blocks) > 0.5 * samples_bytes and sum(rows for rows, _ in blocks) > 20
    assert peak < 20 << 20, peak


def test_streamed_cut_equals_the_whole_recording_s_plan_for_speech_without_pauses(recordings):
    """Speech with only short pauses is cut inside long regions: where the not-yet-final margin matters most."""
    speech = load_recording(recordings["long"]).samples
    rng = np.random.default_rng(5)
    continuous = np.concatenate(
        [np.resize(np.roll(speech, -int(rng.integers(len(speech)))), 40 * RATE) for _ in range(5)]
    )
    for options in (OPTIONS, VadOptions(batch_windows=4, min_silence_s=2.0), VadOptions(batch_windows=4, vad=False)):
        cut = stream_cut.StreamCut(RATE, 30.0, options, None, "x")
        got = []
        for start in range(0, len(continuous), 7 * RATE):
            cut.add(continuous[start : start + 7 * RATE])
            if cut.ready():
                got += cut.step()
                cut.forget()
        got += cut.step(final=True)
        assert got == segment.plan_segments(continuous, RATE, 30.0, options)
        assert len(got) >= 6 and cut.tail.start > 0


def test_a_long_recording_that_fails_after_some_segments_left_is_one_error_row(recordings):
    # Refused as too long only after its first segments were sent: its end row carries the error.
    table = manifest(recordings, ["long", "short"])
    out = recordings_of(
        rows(
            t
            for block in decode_cut.decode_blocks(
                table, 30.0, max_duration_s=150.0, options=OPTIONS, block_bytes=1 << 20
            )
            for t in segment.segment_blocks(block, RATE, 30.0, OPTIONS, isolate=False)
        )
    )
    long = out["long"]
    assert long["error"].startswith("too long: more than 150 s") and long["count"] == len(long["segments"]) >= 3
    assert out["short"]["error"] is None and out["short"]["count"] >= 1


@pytest.mark.parametrize("stage", ["decode", "segment"])
def test_a_long_recording_that_crashes_its_helper_is_one_error_row_of_its_stage(recordings, stage):
    table = manifest(recordings, ["short", "long", "stereo"])
    crash = CrashTest(**{stage: recordings["long"]})
    out = rows(
        t
        for block in decode_cut.decode_blocks(table, 30.0, crash_test=crash, options=OPTIONS)
        for t in segment.segment_blocks(block, RATE, 30.0, OPTIONS, isolate=False)
    )
    long = [r for r in out if r["id"] == "long"]
    assert [(r["segment_count"], r["error"]) for r in long] == [(0, f"{stage} crashed the worker: signal 11 (SIGSEGV)")]
    assert {r["id"] for r in out if r["error"] is None and r["segment_count"]} == {"short", "stereo"}


def pieces_then(sink, seen: list):
    for i in range(5):
        sink(np.full(3, i, np.float32))
        seen.append(i)  # the decoder goes on only once the caller asks for the next piece
    return "decoded"


def test_the_decoder_runs_in_step_with_its_caller_and_unwinds_when_left():
    import functools
    import threading

    threads = threading.active_count()
    seen: list[int] = []
    steps = decode_cut._in_step(functools.partial(pieces_then, seen=seen))
    assert next(steps)[0] == "piece" and seen == []
    assert next(steps)[1].tolist() == [1, 1, 1] and seen == [0]
    steps.close()  # the caller stops early: the decoder stops in its sink, and its thread ends
    assert seen == [0] and threading.active_count() == threads
    every = list(decode_cut._in_step(functools.partial(pieces_then, seen=[])))
    assert [kind for kind, _ in every] == ["piece"] * 5 + ["done"] and every[-1][1] == "decoded"


def _wants_all(table: pa.Table) -> list[bool]:
    return [True] * table.num_rows


def test_speaker_sessions_are_the_same_from_both_paths_and_hold_the_segments_end_to_end(recordings):
    """Speaker sessions (audio/sessions.py): the decode stage (long recordings, grouped as their
    segments arrive) and the segment stage (short ones, planned at once) make the same sessions, and a
    session's samples and calls are its segments' samples and spans, end to end, within the limit."""
    table = manifest(recordings, KINDS)
    sessions = Sessions(_wants_all, max_session_s=70.0)
    plain = recordings_of(
        rows(segment.segment_blocks(decode_table(table, isolate=False), RATE, 30.0, OPTIONS, isolate=False))
    )
    grouped = rows(
        segment.segment_blocks(
            decode_table(table, isolate=False), RATE, 30.0, OPTIONS, isolate=False, sessions=sessions
        )
    )
    blocks = decode_cut.decode_blocks(
        table, 30.0, isolate=False, options=OPTIONS, block_bytes=1 << 20, sessions=sessions
    )
    cut = rows(
        t
        for block in blocks
        for t in segment.segment_blocks(block, RATE, 30.0, OPTIONS, isolate=False, sessions=sessions)
    )
    assert recordings_of(cut) == recordings_of(grouped)
    calls_of = {(r["id"], r["segment_index"]): r["calls"] for r in cut if r["row_kind"] == SEGMENT}
    for key, recording in recordings_of(cut).items():
        segments = [plain[key]["segments"][k] for k in sorted(plain[key]["segments"])]
        assert len(recording["segments"]) == recording["count"] <= len(segments)
        flat = []
        for index in sorted(recording["segments"]):
            start, end, channel, samples = recording["segments"][index]
            calls = calls_of[(key, index)]
            assert sum(c["samples"] for c in calls) == len(samples) <= 70 * RATE
            assert (start, end) == (calls[0]["start_s"], calls[-1]["end_s"])
            flat += [(c["start_s"], c["end_s"], channel) for c in calls]
            offset = 0
            for call in calls:
                own = next(s for s in segments if (s[0], s[1], s[2]) == (call["start_s"], call["end_s"], channel))
                assert samples[offset : offset + call["samples"]] == own[3]
                offset += call["samples"]
        assert sorted(flat, key=lambda c: (c[0], c[2] or 0)) == [(s[0], s[1], s[2]) for s in segments]
    assert recordings_of(cut)["long"]["count"] >= 3  # several sessions, each of several segments
    assert recordings_of(cut)["long"]["count"] < plain["long"]["count"]
