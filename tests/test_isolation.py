"""Crash isolation: native work that kills its process costs one row, never the worker or its neighbours."""

from __future__ import annotations

import functools
import os
import signal

import numpy as np
import pyarrow as pa
import pytest

from conftest import SAMPLES, SPEECH
from granite_batch.audio.decode import decode_table
from granite_batch.audio.isolation import Crash, CrashTest, Stage, map_isolated, stream_isolated
from granite_batch.audio.segment import segment_table

MP3 = str(SAMPLES / "fr_gare.mp3")


def work(item, kill=None, signal_number=signal.SIGSEGV):
    """Module level, so that it pickles by reference into the helper process."""
    if item == kill:
        os.kill(os.getpid(), signal_number)
    if item == "exit":
        os._exit(3)
    if item == 0:
        raise ZeroDivisionError("item 0")
    return np.full(item, item, np.float32)


def pid_of(item, kill=None):
    if item == kill:
        os.kill(os.getpid(), signal.SIGSEGV)
    return item * 10, os.getpid()


def slice_of(item, source):
    return source[item:]


def parts_of(item, kill_at=None, flag=None):
    """Streamed: `item` values (i, pid), a Stage halfway; with `kill_at`, the process dies before
    value `kill_at` of item 3 (only while `flag`, a path, does not exist yet, when given)."""
    yield Stage("decode")
    for i in range(item):
        if i == item // 2:
            yield Stage("segment")
        if item == 3 and i == kill_at and (flag is None or not os.path.exists(flag)):
            if flag is not None:
                open(flag, "w").close()
            os.kill(os.getpid(), signal.SIGSEGV)
        yield item * 10 + i, os.getpid()


def test_streamed_values_come_in_order_from_the_helper_without_the_stage_markers():
    got = list(stream_isolated(parts_of, [2, 0, 3]))
    assert [(index, value) for index, (value, _) in got] == [(0, 20), (0, 21), (2, 30), (2, 31), (2, 32)]
    assert {pid for _, (_, pid) in got} != {os.getpid()}  # made in the helper
    assert [value for _, (value, _) in stream_isolated(parts_of, [2], isolate=False)] == [20, 21]


def test_a_streamed_item_that_kills_its_helper_twice_ends_in_a_crash_of_its_last_stage():
    got = list(stream_isolated(functools.partial(parts_of, kill_at=2), [2, 3, 1]))
    values = [(index, value if isinstance(value, Crash) else value[0]) for index, value in got]
    # Item 3 passed on 30 and 31 before it died; its second run died at the same place, in "segment".
    assert values == [(0, 20), (0, 21), (1, 30), (1, 31), (1, Crash(signal=signal.SIGSEGV, stage="segment")), (2, 10)]
    assert got[4][1].reason("decode") == "segment crashed the worker: signal 11 (SIGSEGV)"


def test_a_streamed_item_whose_helper_died_once_goes_on_without_repeating_its_values(tmp_path):
    got = list(stream_isolated(functools.partial(parts_of, kill_at=2, flag=str(tmp_path / "died")), [3, 2]))
    assert [(index, value[0]) for index, value in got] == [(0, 30), (0, 31), (0, 32), (1, 20), (1, 21)]
    assert got[1][1][1] != got[2][1][1]  # 32 came from the fresh helper


def test_a_stream_may_be_consumed_while_map_isolated_works_and_left_early():
    from granite_batch.audio import isolation

    values = []
    for _index, (value, _) in stream_isolated(parts_of, [4, 2]):
        values.append((value, map_isolated(pid_of, [value])[0][0]))
        if value == 21:
            break  # leaves the stream with values still to come: its helper is ended
    assert values == [(40, 400), (41, 410), (42, 420), (43, 430), (20, 200), (21, 210)]
    assert [value for _, (value, _) in stream_isolated(parts_of, [1])] == [10]  # a fresh stream helper
    assert len(isolation._pool) == 1  # the helper forked for map_isolated while the stream's was busy is gone


def test_an_item_that_kills_its_process_becomes_a_crash_and_the_others_are_computed():
    pid = os.getpid()
    results = map_isolated(functools.partial(work, kill=3), [1, 2, 3, 4, 5])
    assert os.getpid() == pid  # this process lived on
    assert results[2] == Crash(signal=signal.SIGSEGV)
    assert results[2].reason("decode") == "decode crashed the worker: signal 11 (SIGSEGV)"
    for i in (0, 1, 3, 4):
        assert results[i].tolist() == [i + 1] * (i + 1)


def test_aborts_and_exits_are_crashes_too():
    abort = functools.partial(work, kill=2, signal_number=signal.SIGABRT)
    assert map_isolated(abort, [2])[0].reason("segment") == "segment crashed the worker: signal 6 (SIGABRT)"
    assert map_isolated(work, ["exit", 1])[0].reason("decode") == "decode crashed the worker: exit status 3"


def test_an_exception_is_raised_in_the_caller_as_itself_and_the_helper_goes_on():
    with pytest.raises(ZeroDivisionError, match="item 0"):
        map_isolated(work, [1, 0])
    assert map_isolated(work, [2])[0].tolist() == [2, 2]


def test_large_results_and_arguments_travel_whole():
    hour = np.arange(16000 * 3600, dtype=np.float32)
    back = map_isolated(functools.partial(slice_of, source=hour), [0, 5])
    assert np.array_equal(back[0], hour) and np.array_equal(back[1], hour[5:])
    assert back[0].flags.writeable


def test_the_helper_is_kept_for_the_next_batch_and_replaced_after_a_crash():
    first = map_isolated(pid_of, [1, 2, 3])
    assert [value for value, _ in first] == [10, 20, 30]
    helper = first[0][1]
    assert helper != os.getpid() and {pid for _, pid in first} == {helper}
    assert map_isolated(pid_of, [4])[0][1] == helper  # the same helper
    crashed = map_isolated(functools.partial(pid_of, kill=7), [1, 7, 3])
    assert crashed[1] == Crash(signal=signal.SIGSEGV)
    assert [crashed[0][0], crashed[2][0]] == [10, 30]
    assert crashed[0][1] == helper and crashed[2][1] not in (helper, os.getpid())  # the rest in a fresh one


def test_isolate_false_runs_in_this_process():
    assert [pid for _, pid in map_isolated(pid_of, [1, 2], isolate=False)] == [os.getpid()] * 2


def test_decode_stage_turns_a_crashing_recording_into_an_error_row_and_decodes_its_neighbours():
    table = pa.table({"audio": [str(SPEECH), MP3, str(SPEECH)], "error": [None, None, None]})
    alone = decode_table(table, isolate=False)
    out = decode_table(table, crash_test=CrashTest(decode=MP3))
    assert out.column("error").to_pylist() == [None, "decode crashed the worker: signal 11 (SIGSEGV)", None]
    assert out.column("duration_s").to_pylist()[1] is None
    samples = out.column("samples").to_pylist()
    assert samples[1] is None
    assert samples[0] == samples[2] == alone.column("samples").to_pylist()[0]


def test_segment_stage_turns_a_crashing_recording_into_an_error_row_and_segments_its_neighbours():
    decoded = decode_table(pa.table({"audio": [str(SPEECH), MP3, str(SPEECH)], "error": [None, None, None]}))
    expected = segment_table(decoded, 16000, 30.0, isolate=False)
    out = segment_table(decoded, 16000, 30.0, crash_test=CrashTest(segment=MP3))

    def by_recording(table):  # audio -> (errors, (start_s, end_s) of its segment rows)
        rows = {}
        for row in table.select(["audio", "error", "start_s", "end_s"]).to_pylist():
            errors, bounds = rows.setdefault(row["audio"], (set(), []))
            errors.add(row["error"])
            if row["start_s"] is not None:
                bounds.append((row["start_s"], row["end_s"]))
        return rows

    got, want = by_recording(out), by_recording(expected)
    assert got[MP3] == ({"segment crashed the worker: signal 11 (SIGSEGV)"}, [])  # one error row, no segment
    assert got[str(SPEECH)] == want[str(SPEECH)] and want[str(SPEECH)][1]
    # Without a crash the isolated stage gives what the plain one gives.
    assert by_recording(segment_table(decoded, 16000, 30.0)) == want


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def test_the_helper_does_not_keep_a_request_s_samples_while_it_waits_for_the_next():
    from granite_batch.audio import isolation

    assert isolation.map_isolated(len, [np.zeros(10, np.float32)]) == [10]  # the helper is up
    helper = isolation._pool[0].pid
    before = _rss_mb(helper)
    hour = np.ones(16000 * 3600, np.float32)  # an hour of 16 kHz samples: 230 MB
    assert isolation.map_isolated(len, [hour]) == [len(hour)]
    assert isolation._pool[0].pid == helper  # the same helper did the work and lives on
    # The helper frees the request after its reply; wait (up to 10 s) for it to be idle again.
    import time

    deadline = time.monotonic() + 10
    while _rss_mb(helper) - before >= 40 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _rss_mb(helper) - before < 40, "the helper still holds the last request's samples"
