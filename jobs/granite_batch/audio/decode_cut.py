"""The decode stage: recordings decoded, and long ones cut into their segments as they are decoded.

A recording shorter than `segment.long_recording_s` (17 minutes) leaves this stage whole, for
`segment.segment_blocks` to cut beside its neighbours (their VAD windows share batches). A longer
one gains nothing from sharing (its windows fill whole batches), so the helper process that decodes
it (isolation.stream_isolated: a crash costs its row, not the worker) also cuts it as it goes
(`segment.StreamCut`), and sends its segment rows back a table at a time: no process holds a long
mono recording whole, the worker one table of its segments, the helper one group of VAD windows and
the speech not yet cut. The decoder runs in a thread of the helper, in step with the cutting, so a
crash is always the stage that was running ("decode crashed the worker", "segment crashed the
worker").
"""

from __future__ import annotations

import functools
import queue
import threading

import numpy as np
import pyarrow as pa

from granite_batch.audio import decode as audio
from granite_batch.audio.isolation import Crash, CrashTest, Stage, stream_isolated
from granite_batch.audio.segment import SEGMENT_BLOCK_BYTES, long_recording_s, plan_recordings
from granite_batch.audio.sessions import Call, SessionBuilder, Sessions, session_piece
from granite_batch.audio.stream_cut import StreamCut
from granite_batch.audio.vad import VAD_RATE_HZ, VadOptions, warm_vad
from granite_batch.schema import END, SEGMENT, WHOLE, segment_rows


def decode_blocks(
    table: pa.Table,
    max_segment_s: float,
    storage_options: dict | None = None,
    sample_rate_hz: int = VAD_RATE_HZ,
    max_duration_s: float | None = None,
    timeout_s: float | None = None,
    isolate: bool = True,
    crash_test: CrashTest | None = None,
    allowed_prefixes: tuple[str, ...] = (),
    options: VadOptions = VadOptions(),
    block_bytes: int = SEGMENT_BLOCK_BYTES,
    sessions: Sessions | None = None,
):
    """Decode stage: `audio.decode_table`, except that a recording at least `long_recording_s` long
    is also cut into its segments in the helper process that decodes it, as it decodes it
    (`StreamCut`), and its segment rows come back in tables of about `block_bytes` of samples: no
    process holds a long mono recording whole, the worker one table of its segments at a time.

    All rows are schema.segment_rows. A long recording's segments come first, SEGMENT rows with
    null `segment_count` and `duration_s` (more are to come). Every row of `table` comes once in the
    last table: a short recording as a WHOLE row (`segment.segment_blocks` cuts them, many side by
    side), a failed one as a WHOLE row with its error, and a long one as its END row: no samples,
    `segment_count` (how many segment rows it sent before), `duration_s`, and an error if it failed
    after some segments had left (assemble.RecordingAssembler waits for them, then writes the error). Its
    segments are those `segment_blocks` would give (the same VAD windows, the same plan: tested). A
    crash while decoding or cutting it is its row's "decode crashed the worker" or "segment crashed
    the worker" (isolation.stream_isolated, which reruns it alone first and skips what was sent).
    With `sessions`, a long recording it wants leaves as speaker sessions (sessions.py), grouped here
    as its segments arrive (the same sessions `segment_blocks` plans); its END row counts sessions.
    """
    errors, items, todo = audio.decode_inputs(table)
    decode = audio.row_decoder(storage_options, sample_rate_hz, max_duration_s, timeout_s, crash_test, allowed_prefixes)
    work = functools.partial(
        _decode_and_cut,
        decode=decode,
        sample_rate_hz=sample_rate_hz,
        max_segment_s=max_segment_s,
        options=options,
        crash_test=crash_test,
        block_bytes=block_bytes,
    )
    if isolate and todo and options.vad:
        warm_vad()  # before the stream's helper is forked, so that it starts warm
    base = table.drop_columns([c for c in ("audio_bytes",) if c in table.column_names])
    decoded: dict[int, tuple[np.ndarray | None, float | None]] = {}  # row: (samples or None, duration_s)
    counts: dict[int, int] = {}  # a long recording's row: how many segment rows it sent
    sent: dict[int, int] = {}  # row: segment rows yielded
    wants = sessions.wants(base) if sessions is not None else [False] * table.num_rows
    builders: dict[int, SessionBuilder] = {}  # a long recording's open session
    for k, value in stream_isolated(work, [items[i] for i in todo], isolate=isolate):
        row = todo[k]
        if isinstance(value, Crash):
            errors[row] = value.reason("decode")
            builders.pop(row, None)  # its calls not yet sent go with it: the recording fails
            if sent.get(row):  # its segments already left: its end row carries the error
                counts[row] = sent[row]
        elif value[0] == "whole":
            _, samples, duration, errors[row] = value
            decoded[row] = samples, duration
        elif value[0] == "segments":
            _, bounds, samples = value
            if not wants[row] or sessions is None:
                yield _cut_rows(base, row, sent.get(row, 0), bounds, samples, sample_rate_hz)
                sent[row] = sent.get(row, 0) + len(bounds)
                continue
            builder = builders.setdefault(row, SessionBuilder(int(sessions.max_session_s * sample_rate_hz)))
            ends = np.cumsum([end - start for start, end, _ in bounds])
            pieces = np.split(samples, ends[:-1])
            closed = [c for (a, b, ch), piece in zip(bounds, pieces) if (c := builder.add((a, b, ch, piece.copy())))]
            if closed:
                yield _session_rows(base, row, sent.get(row, 0), closed, sample_rate_hz)
                sent[row] = sent.get(row, 0) + len(closed)
        else:
            _, duration, counts[row], errors[row] = value
            decoded[row] = None, duration
            last_session = builders.pop(row).flush() if row in builders else None
            if last_session and errors[row] is None:
                yield _session_rows(base, row, sent.get(row, 0), [last_session], sample_rate_hz)
                sent[row] = sent.get(row, 0) + 1
            if wants[row] and sessions is not None:
                counts[row] = sent.get(row, 0)
    # Every row once more: whole (short or failed, for segment_blocks), or the end row of a long one
    # (segment_count: how many segment rows it had; the driver waits for them).
    last = audio.decoded_table(table, errors, decoded)
    n = table.num_rows
    yield segment_rows(
        last.drop_columns(["samples"]),
        last.column("samples"),
        row_kind=[END if i in counts else WHOLE for i in range(n)],
        segment_count=[counts.get(i) for i in range(n)],
    )


def _decode_and_cut(
    item,
    decode,
    sample_rate_hz: int,
    max_segment_s: float,
    options: VadOptions,
    crash_test: CrashTest | None,
    block_bytes: int,
):
    """In the helper (isolation.stream_isolated): decode one row, then ("whole", samples, duration,
    error) for a short or failed recording, or, for a long one, its segments as ("segments",
    [(start, end, channel)], their samples end to end), about `block_bytes` at a time, then ("end",
    duration, segment count, error). A long mono recording is cut as it is decoded (`StreamCut`),
    so no more than a group of VAD windows and the speech not yet cut is held; a long recording with
    split channels is held whole while it is cut."""
    yield Stage("decode")
    if item[2]:  # split channels
        samples, duration, error = decode(item)
        if samples is None or duration < long_recording_s(options):
            yield "whole", samples, duration, error
            return
        yield Stage("segment")
        errors: list[str | None] = [None]
        bounds = plan_recordings(
            [samples.reshape(-1)],
            [samples.shape[0]],
            [item[0]],
            errors,
            sample_rate_hz,
            max_segment_s,
            options,
            False,
            crash_test,
        ).get(0, [])
        del samples
        yield from _sent_in_blocks([(b[:3], b[3][b[0] : b[1]]) for b in bounds], block_bytes)
        yield "end", duration, len(bounds), None
        return
    head: list[np.ndarray] = []  # the first pieces, until the recording is known to be long
    held = 0
    cut: StreamCut | None = None
    sent = 0
    for kind, value in _in_step(functools.partial(decode, item)):
        if kind == "piece":
            if cut is None:
                head.append(value)
                held += len(value)
                if held < long_recording_s(options) * sample_rate_hz:
                    continue
                cut = StreamCut(sample_rate_hz, max_segment_s, options, crash_test, item[0])
                for piece in head:
                    cut.add(piece)
                head = []
            else:
                cut.add(value)
            del value
            if not cut.ready():
                continue
            yield Stage("segment")
            sent += yield from _cut_and_send(cut, False, block_bytes)
            yield Stage("decode")
            continue
        _, duration, error = value
        if cut is None:  # short, or failed before it was known to be long
            yield "whole", (np.concatenate(head) if head and error is None else None), duration, error
            return
        if error is None:
            yield Stage("segment")
            sent += yield from _cut_and_send(cut, True, block_bytes)
        yield "end", duration, sent, error
        return


def _cut_and_send(cut: StreamCut, final: bool, block_bytes: int):
    """`cut.step`'s new segments, sent in blocks; returns how many."""
    segments = cut.step(final=final)
    yield from _sent_in_blocks([((a, b, None), cut.samples(a, b)) for a, b in segments], block_bytes)
    cut.forget()
    return len(segments)


def _sent_in_blocks(segments: list[tuple[tuple[int, int, int | None], np.ndarray]], block_bytes: int):
    """("segments", bounds, samples end to end) values of about `block_bytes` each."""
    chunk: list[tuple[tuple[int, int, int | None], np.ndarray]] = []
    size = 0
    for k, (bound, samples) in enumerate(segments):
        chunk.append((bound, samples))
        size += samples.nbytes
        if size >= block_bytes or k == len(segments) - 1:
            yield "segments", [b for b, _ in chunk], np.concatenate([a for _, a in chunk])
            chunk, size = [], 0


def _in_step(decode):
    """Run `decode(sink=...)` (audio._decode_row) in a thread, in step with the caller: ("piece",
    samples) for each piece it decodes, while the thread waits, then ("done", its result); an
    exception it raises is raised here. Never both at once, so a crash is the stage the caller names."""
    handoff: queue.Queue = queue.Queue()  # one piece at a time: the sink waits for `resume`
    resume = threading.Semaphore(0)
    stop = threading.Event()

    def sink(piece: np.ndarray) -> None:
        handoff.put(("piece", piece))
        resume.acquire()
        if stop.is_set():
            raise _Stopped()

    def run() -> None:
        try:
            handoff.put(("done", decode(sink=sink)))
        except BaseException as exc:  # noqa: BLE001 - raised in the caller (_Stopped: nobody is waiting)
            handoff.put(("raised", exc))

    thread = threading.Thread(target=run, name="decode", daemon=True)
    thread.start()
    try:
        while True:
            kind, value = handoff.get()
            if kind == "raised":
                raise value
            yield kind, value
            if kind == "done":
                return
            resume.release()
    finally:
        if thread.is_alive():  # the caller stopped early: the sink raises _Stopped and the decoder unwinds
            stop.set()
            resume.release()
        thread.join()


def _session_rows(base: pa.Table, row: int, first: int, sessions: list[list[Call]], sample_rate_hz: int) -> pa.Table:
    """Session rows `first`.. of `base`'s row `row` (sessions.py), in decode_blocks' columns; their
    `segment_count` is null, as `_cut_rows`'."""
    n = len(sessions)
    pieces = [session_piece(session, sample_rate_hz) for session in sessions]
    out = base.take(pa.array([row] * n, pa.int64()))
    out = out.set_column(out.schema.get_field_index("error"), "error", pa.nulls(n, pa.string()))
    out = out.append_column("duration_s", pa.nulls(n, pa.float64()))
    out = out.append_column("channel_count", pa.nulls(n, pa.int32()))
    return segment_rows(
        out,
        audio.samples_to_arrow([piece[3] for piece in pieces]),
        row_kind=SEGMENT,
        segment_index=list(range(first, first + n)),
        start_s=[piece[0] / sample_rate_hz for piece in pieces],
        end_s=[piece[1] / sample_rate_hz for piece in pieces],
        channel=[piece[2] for piece in pieces],
        calls=[piece[4] for piece in pieces],
    )


class _Stopped(BaseException):
    """Raised in the decoder's sink when its consumer has stopped."""


def _cut_rows(
    base: pa.Table,
    row: int,
    first: int,
    bounds: list[tuple[int, int, int | None]],
    samples: np.ndarray,
    sample_rate_hz: int,
) -> pa.Table:
    """Segment rows `first`.. of `base`'s row `row`, in decode_blocks' columns, around `samples`
    (the segments' samples end to end, as the helper sent them: no copy). Their `segment_count` is
    null: the recording's END row, which comes after them, has it (and `duration_s`)."""
    n = len(bounds)
    out = base.take(pa.array([row] * n, pa.int64()))
    out = out.set_column(out.schema.get_field_index("error"), "error", pa.nulls(n, pa.string()))
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum([end - start for start, end, _ in bounds], out=offsets[1:])
    out = out.append_column("duration_s", pa.nulls(n, pa.float64()))
    out = out.append_column("channel_count", pa.nulls(n, pa.int32()))
    return segment_rows(
        out,
        pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(samples)),
        row_kind=SEGMENT,
        segment_index=list(range(first, first + n)),
        start_s=[b[0] / sample_rate_hz for b in bounds],
        end_s=[b[1] / sample_rate_hz for b in bounds],
        channel=[b[2] for b in bounds],
    )
