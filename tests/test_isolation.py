"""Crash isolation: native work that kills its process costs one row, never the worker or its neighbours."""

from __future__ import annotations

import os
import signal

import numpy as np
import pyarrow as pa
import pytest

from conftest import SAMPLES, SPEECH
from granite_batch.audio import decode_table
from granite_batch.isolation import Crash, CrashTest, call_isolated, map_isolated
from granite_batch.segment import segment_table

MP3 = str(SAMPLES / "fr_gare.mp3")


def kill_on(value, signal_number=signal.SIGSEGV):
    def work(item):
        if item == value:
            os.kill(os.getpid(), signal_number)
        return np.full(item, item, np.float32)
    return work


def test_an_item_that_kills_its_process_becomes_a_crash_and_the_others_are_computed():
    pid = os.getpid()
    results = map_isolated(kill_on(3), [1, 2, 3, 4, 5])
    assert os.getpid() == pid  # this process lived on
    assert results[2] == Crash(signal=signal.SIGSEGV)
    assert results[2].reason("decode") == "decode crashed the worker: signal 11 (SIGSEGV)"
    for i in (0, 1, 3, 4):
        assert results[i].tolist() == [i + 1] * (i + 1)


def test_aborts_and_exits_are_crashes_too():
    assert map_isolated(kill_on(2, signal.SIGABRT), [2])[0].reason("segment") == \
        "segment crashed the worker: signal 6 (SIGABRT)"
    assert map_isolated(lambda item: os._exit(3), [1])[0].reason("decode") == "decode crashed the worker: exit status 3"


def test_an_exception_is_raised_in_the_caller_as_itself():
    with pytest.raises(ZeroDivisionError):
        map_isolated(lambda item: 1 / item, [1, 0])


def test_large_results_come_back_whole():
    hour = np.arange(16000 * 3600, dtype=np.float32)
    back = map_isolated(lambda item: hour[item:], [0, 5])
    assert np.array_equal(back[0], hour) and np.array_equal(back[1], hour[5:])
    assert back[0].flags.writeable


def test_a_batch_that_crashes_is_redone_item_by_item():
    calls = []

    def batch(items):
        calls.append(len(items))  # in the children: this list stays empty here
        if 7 in items:
            os.kill(os.getpid(), signal.SIGSEGV)
        return [item * 10 for item in items]

    assert call_isolated(batch, [1, 2, 3]) == [10, 20, 30]
    assert call_isolated(batch, [1, 7, 3]) == [10, Crash(signal=signal.SIGSEGV), 30]
    assert calls == []


def test_isolate_false_runs_in_this_process():
    seen = []
    map_isolated(seen.append, [1, 2], isolate=False)
    assert seen == [1, 2]


def test_decode_stage_turns_a_crashing_recording_into_an_error_row_and_decodes_its_neighbours():
    table = pa.table({"audio": [str(SPEECH), MP3, str(SPEECH)], "error": [None, None, None]})
    alone = decode_table(table, isolate=False)
    out = decode_table(table, crash_test=CrashTest("decode", MP3))
    assert out.column("error").to_pylist() == [None, "decode crashed the worker: signal 11 (SIGSEGV)", None]
    assert out.column("duration_s").to_pylist()[1] is None
    samples = out.column("samples").to_pylist()
    assert samples[1] is None
    assert samples[0] == samples[2] == alone.column("samples").to_pylist()[0]


def test_segment_stage_turns_a_crashing_recording_into_an_error_row_and_segments_its_neighbours():
    decoded = decode_table(pa.table({"audio": [str(SPEECH), MP3, str(SPEECH)], "error": [None, None, None]}))
    expected = segment_table(decoded, 16000, 30.0, isolate=False)
    out = segment_table(decoded, 16000, 30.0, crash_test=CrashTest("segment", MP3))
    assert out.column("error").to_pylist() == [None, "segment crashed the worker: signal 11 (SIGSEGV)", None]
    starts = out.column("segment_starts").to_pylist()
    assert starts[1] is None
    assert starts[0] == starts[2] == expected.column("segment_starts").to_pylist()[0] != []
    # Without a crash the isolated stage gives what the plain one gives.
    assert segment_table(decoded, 16000, 30.0).column("segment_ends") == expected.column("segment_ends")
