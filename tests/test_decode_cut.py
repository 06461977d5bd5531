"""Long recordings are decoded and cut in one helper process: the worker gets their segments, never them."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
import soundfile as sf

from conftest import SAMPLES
from granite_batch import segment
from granite_batch.audio import decode_table, load_recording
from granite_batch.isolation import CrashTest
from granite_batch.segment import VadOptions

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
        parts += [np.resize(piece, int(rng.uniform(2, 12) * RATE)), np.zeros(int(rng.uniform(0.2, 4) * RATE), np.float32)]
    long = np.concatenate(parts)
    paths = {"long": folder / "long.flac", "stereo": folder / "stereo.flac", "short": folder / "short.flac",
             "silent": folder / "silent.flac", "broken": folder / "broken.flac"}
    sf.write(paths["long"], long, RATE)
    sf.write(paths["stereo"], np.stack([long[: 100 * RATE], np.roll(long, 7 * RATE)[: 100 * RATE]], axis=1), RATE)
    sf.write(paths["short"], long[: 20 * RATE], RATE)
    sf.write(paths["silent"], np.zeros(90 * RATE, np.float32), RATE)
    paths["broken"].write_bytes(b"not audio at all" * 100)
    return {kind: str(path) for kind, path in paths.items()}


def manifest(recordings: dict[str, str], kinds: list[str]) -> pa.Table:
    return pa.table({"id": kinds, "audio": [recordings[k] for k in kinds], "error": pa.nulls(len(kinds), pa.string()),
                     "channels": ["split" if k == "stereo" else "mix" for k in kinds]})


def rows(tables) -> list[dict]:
    table = pa.concat_tables(list(tables))
    return sorted(table.to_pylist(), key=lambda r: (r["id"], -1 if r["segment_index"] is None else r["segment_index"]))


KINDS = ["short", "long", "broken", "silent", "stereo"]


@pytest.mark.parametrize("isolate", [True, False], ids=["helper", "in-process"])
def test_cut_where_decoded_gives_the_rows_of_decoding_then_segmenting(recordings, isolate):
    table = manifest(recordings, KINDS)
    before = rows(segment.segment_blocks(decode_table(table, isolate=False), RATE, 30.0, OPTIONS, isolate=False))
    blocks = list(segment.decode_blocks(table, 30.0, isolate=isolate, options=OPTIONS, block_bytes=2 << 20))
    after = rows(table for block in blocks for table in segment.segment_blocks(block, RATE, 30.0, OPTIONS, isolate=False))
    assert after == before
    counts = {r["id"]: r["segment_count"] for r in after}
    assert counts["long"] > 6 and counts["stereo"] > 4 and counts["silent"] == 0 and counts["short"] >= 1
    assert [r["error"] is not None for r in after if r["id"] == "broken"] == [True]
    # The long recordings' segments came in tables of about 2 MB of samples, never the recording;
    # the last table has the short, silent and broken ones.
    cut = blocks[:-1]
    assert len(cut) >= 4 and set(pc.unique(pa.concat_tables(cut).column("id")).to_pylist()) == {"long", "stereo"}
    assert all(block.column("samples").nbytes < (2 << 20) + 30 * RATE * 4 + 4096 for block in cut)
    assert sorted(blocks[-1].column("id").to_pylist()) == ["broken", "short", "silent"]
    assert blocks[-1].column("segment_count").to_pylist()[blocks[-1].column("id").to_pylist().index("silent")] == 0


@pytest.mark.parametrize("stage", ["decode", "segment"])
def test_a_long_recording_that_crashes_its_helper_is_one_error_row_of_its_stage(recordings, stage):
    table = manifest(recordings, ["short", "long", "stereo"])
    crash = CrashTest(**{stage: recordings["long"]})
    out = rows(t for block in segment.decode_blocks(table, 30.0, crash_test=crash, options=OPTIONS)
               for t in segment.segment_blocks(block, RATE, 30.0, OPTIONS, isolate=False))
    long = [r for r in out if r["id"] == "long"]
    assert [(r["segment_count"], r["error"]) for r in long] == [(0, f"{stage} crashed the worker: signal 11 (SIGSEGV)")]
    assert {r["id"] for r in out if r["error"] is None and r["segment_count"]} == {"short", "stereo"}
