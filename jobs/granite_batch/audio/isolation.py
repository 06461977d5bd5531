"""Run a stage's native work in a forked child process, so a crash costs one row, not the worker.

A segfault or abort in native code (FFmpeg through PyAV, soxr, torch in the VAD) ends the process it
happens in. In a Ray worker that loses every row of the task, and Ray retries the same task on the
same rows without end: one poison recording stops the job. Here the work runs in a helper process
forked from the worker, which keeps it for the next batches (a fork server: forking a worker that
holds torch costs about 30 ms, and a fresh child would redo TorchScript's warm-up every time). Work
goes to it and results come back through pipes, row by row as they are done. When the helper dies
by a signal, the rows done before are kept, the row it was working on is retried alone in a fresh
helper, and if that one dies too the row gets a `Crash` (the stage makes it an error row:
"decode crashed the worker: signal 11 (SIGSEGV)"); the rows after it go on. The worker itself never
runs the native code, so it never dies of it. `stream_isolated` does the same for work that sends
back a row's results piece by piece as it makes them (a long recording's segments).

The helper runs only our plain code (PyAV, numpy, soxr, torch on one thread), never Ray; it ends
when its worker does (its request pipe closes) and leaves with os._exit. The functions it runs must
pickle by reference (module-level functions, or functools.partial of one). Arguments and results
travel as pickle protocol 5 with out-of-band buffers: a sample array is written to the pipe from its
own memory and read into the one buffer the receiver keeps.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import signal as signals
import struct
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any, Literal

import numpy as np

_HEADER = struct.Struct("<BQI")  # kind, metadata bytes, out-of-band buffers
_LENGTH = struct.Struct("<Q")
_WORK, _RESULT, _RAISED, _DONE, _END = 1, 2, 3, 4, 5
_PIPE_BYTES = 1 << 20  # a larger pipe: fewer wake-ups while a recording's samples stream through


@dataclass(frozen=True)
class Crash:
    """The work on one item killed its process, also when retried alone in a fresh one."""

    signal: int | None = None
    exit_code: int | None = None
    stage: str | None = None  # the last `Stage` a streamed item named (stream_isolated)

    def reason(self, stage: str) -> str:
        """The error row's text, e.g. "decode crashed the worker: signal 11 (SIGSEGV)"; `stage`
        unless the item named its own."""
        stage = self.stage or stage
        if self.signal is not None:
            try:
                name = f" ({signals.Signals(self.signal).name})"
            except ValueError:
                name = ""
            return f"{stage} crashed the worker: signal {self.signal}{name}"
        return f"{stage} crashed the worker: exit status {self.exit_code}"


@dataclass(frozen=True)
class Stage:
    """Yielded by a function run through `stream_isolated` to say what it does from now on (e.g.
    "segment" after "decode"): a crash after it is that stage's. Not passed on to the caller."""

    name: str


@dataclass(frozen=True)
class CrashTest:
    """Test only: the process working on the row whose `audio` is the one named for its stage
    kills itself with `signal`, as a native crash would. Given to the stages as an argument
    (`run_job(..., crash_test=)`), never set in production."""

    decode: str | None = None
    segment: str | None = None
    model: str | None = None
    escalation: str | None = None  # a cascade's second model (inference/escalation.py)
    signal: int = int(signals.SIGSEGV)

    def check(self, stage: Literal["decode", "segment", "model", "escalation"], audio: Sequence[str | None]) -> None:
        """Kill this process if the row chosen for `stage` is among `audio`."""
        chosen = getattr(self, stage)
        if chosen is not None and chosen in audio:
            os.kill(os.getpid(), self.signal)


def can_fork() -> bool:
    """Whether this platform forks safely (Linux); elsewhere the work runs in the worker itself."""
    return hasattr(os, "fork") and os.uname().sysname == "Linux"


def map_isolated(fn: Callable[[Any], Any], items: Sequence[Any], isolate: bool = True) -> list[Any]:
    """`[fn(item) for item in items]`, computed in the helper process. An item whose `fn` kills
    the helper, twice (among the others, then alone in a fresh helper), gives a `Crash` in its
    place; the other items' results are those of `fn`. An exception `fn` raises is raised here."""
    if not isolate or _in_helper or not can_fork():
        return [fn(item) for item in items]
    return _run(fn, list(items))


def _run(fn, items: list) -> list:
    results: list[Any] = [None] * len(items)
    start = 0
    while start < len(items):
        with _borrowed() as helper:
            done, crash = helper.run(fn, items[start:])
        results[start : start + len(done)] = done
        start += len(done)
        if crash is None:
            break
        # The helper died on items[start]: once more, alone, in a fresh helper, so a crash its
        # neighbours caused, or a transient one, does not fail it.
        with _borrowed() as helper:
            alone, crash = helper.run(fn, [items[start]])
        results[start] = alone[0] if crash is None else crash
        start += 1
    return results


def stream_isolated(
    fn: Callable[[Any], Iterator[Any]], items: Sequence[Any], isolate: bool = True
) -> Iterator[tuple[int, Any]]:
    """`(i, value)` for each value the generator `fn(items[i])` yields, item after item, computed in
    the helper process and sent back as it is made, so neither process holds more than the
    values in flight. `Stage` values are not passed on; they name what the item is doing.

    An item whose `fn` kills the helper is run again alone in a fresh helper, which skips the values
    already passed on (`fn` must give the same values again); if that one dies too, `(i, Crash)`
    (with the item's last `Stage`) ends its values, and the next items go on. An exception `fn`
    raises is raised here. The caller may use `map_isolated` while it consumes the stream (a second
    helper is forked for it while the stream's is busy, and ended after).
    """
    items = list(items)
    if not isolate or _in_helper or not can_fork():
        for i, item in enumerate(items):
            yield from ((i, value) for value in fn(item) if not isinstance(value, Stage))
        return
    start = 0
    while start < len(items):
        index, passed, stage, crash = start, 0, None, None
        for kind, value in _streamed(fn, items[start:]):
            if kind == _END:
                index, passed, stage = index + 1, 0, None
            elif kind == _DONE:
                crash = value
            elif isinstance(value, Stage):
                stage = value.name
            else:
                passed += 1
                yield index, value
        if crash is None:
            return
        # The helper died on items[index]: once more, alone, in a fresh helper, from the start,
        # without the values its first run passed on.
        stage = None
        for kind, value in _streamed(fn, [items[index]]):
            if kind == _DONE and value is not None:
                yield index, replace(value, stage=stage)
            elif kind == _RESULT and isinstance(value, Stage):
                stage = value.name
            elif kind == _RESULT and passed:
                passed -= 1
            elif kind == _RESULT:
                yield index, value
        start = index + 1


def _streamed(fn, items: list) -> Iterator[tuple[int, Any]]:
    """A helper's messages for `fn` on `items`, streamed: (_RESULT, value), (_END, None) after each
    item, then (_DONE, None), or (_DONE, Crash) if it died. A consumer that stops early ends the helper."""
    with _borrowed() as helper:
        finished = False
        try:
            yield from helper.stream(fn, items)
            finished = True
        finally:
            if not finished and helper.alive:  # messages still on their way: this helper cannot be reused
                os.kill(helper.pid, signals.SIGKILL)
                helper._died()


class _Helper:
    """A child forked from this process that runs work sent to it until its pipes close."""

    def __init__(self):
        request_read, self._request = os.pipe()
        self._results, results_write = os.pipe()
        for fd in (self._request, results_write):
            _grow_pipe(fd)
        self.owner = os.getpid()
        self.busy = False
        self.pid = os.fork()
        if self.pid == 0:  # the helper: never returns
            os.close(self._request)
            os.close(self._results)
            for other in _pool:  # the other helpers' pipes are not this one's to keep open
                if other.owner == self.owner and other.alive:
                    os.close(other._request)
                    os.close(other._reader.fileno())
            _serve(request_read, results_write)
        os.close(request_read)
        os.close(results_write)
        self._reader = os.fdopen(self._results, "rb", buffering=_PIPE_BYTES)
        self.alive = True

    def run(self, fn, items: list) -> tuple[list, Crash | None]:
        """The results of `fn` on `items`, in order, until the
        helper ends the work (Crash None) or dies (the results it sent, and how it died)."""
        done: list[Any] = []
        try:
            _write_message(self._request, _WORK, (fn, items, False))
        except (BrokenPipeError, OSError):
            return done, self._died()
        while True:
            message = _read_message(self._reader)
            if message is None:
                return done, self._died()
            kind, value = message
            if kind == _DONE:
                return done, None
            if kind == _RAISED:
                _read_message(self._reader)  # its _DONE
                raise value
            done.append(value)

    def stream(self, fn, items: list) -> Iterator[tuple[int, Any]]:
        """`_streamed`'s messages, from this helper."""
        try:
            _write_message(self._request, _WORK, (fn, items, True))
        except (BrokenPipeError, OSError):
            yield _DONE, self._died()
            return
        while True:
            message = _read_message(self._reader)
            if message is None:
                yield _DONE, self._died()
                return
            kind, value = message
            if kind == _RAISED:
                _read_message(self._reader)  # its _DONE
                raise value
            yield kind, value
            if kind == _DONE:
                return

    def close(self) -> None:
        """End this helper: it leaves when it reads the end of its request pipe."""
        self.alive = False
        os.close(self._request)
        self._reader.close()
        os.waitpid(self.pid, 0)

    def _died(self) -> Crash:
        self.alive = False
        self._reader.close()
        os.close(self._request)
        _, status = os.waitpid(self.pid, 0)
        if os.WIFSIGNALED(status):
            return Crash(signal=os.WTERMSIG(status))
        return Crash(exit_code=os.waitstatus_to_exitcode(status))


# This process's helpers, one batch at a time each: the first is kept for the next batches; another
# is forked only while it is busy (a stream's consumer calling map_isolated) and ended after.
_pool_lock = threading.Lock()
_pool: list[_Helper] = []
_in_helper = False  # in the helper itself, work nested in work runs in place


@contextlib.contextmanager
def _borrowed() -> Iterator[_Helper]:
    """A free live helper of this process for one batch (forked if none is)."""
    with _pool_lock:
        _pool[:] = [h for h in _pool if h.alive and h.owner == os.getpid()]
        helper = next((h for h in _pool if not h.busy), None)
        if helper is None:
            helper = _Helper()
            _pool.append(helper)
        helper.busy = True
    try:
        yield helper
    finally:
        with _pool_lock:
            helper.busy = False
            if helper.alive and helper is not _pool[0]:
                helper.close()


def _grow_pipe(fd: int) -> None:
    try:
        import fcntl

        fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass  # a smaller pipe only means more round trips


def _serve(request_read: int, results_write: int) -> None:
    global _in_helper
    _in_helper = True
    _die_with_parent()
    code = 0
    try:
        with os.fdopen(request_read, "rb", buffering=_PIPE_BYTES) as requests:
            while (message := _read_message(requests)) is not None:
                _work(message[1], results_write)
                # Not kept while waiting for the next work: the last request's samples (a whole
                # recording's, hundreds of MB for an hour) would stay in the helper until then.
                del message
    except BaseException:  # noqa: BLE001 - a broken pipe: the worker is gone
        code = 1
    finally:
        os._exit(code)  # no atexit handlers, no flushing of the worker's buffers, no Ray shutdown


def _work(request: tuple, results_write: int) -> None:
    """Send the result of each item of one request (streamed: each value it yields, then _END),
    then _DONE; its locals go when it returns."""
    fn, items, streamed = request
    try:
        for item in items:
            if not streamed:
                _write_message(results_write, _RESULT, fn(item))
                continue
            for value in fn(item):
                _write_message(results_write, _RESULT, value)
                del value  # not kept while the next is made
            _write_message(results_write, _END, None)
    except Exception as exc:  # noqa: BLE001 - the worker raises it as its own
        _send_exception(results_write, exc)
    _write_message(results_write, _DONE, None)


def _die_with_parent() -> None:
    """Linux: SIGKILL this helper when the worker that forked it dies, even mid-recording."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signals.SIGKILL))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass  # then it ends at its next read of the closed request pipe


def _send_exception(fd: int, exc: Exception) -> None:
    try:
        _write_message(fd, _RAISED, exc)
    except Exception:  # noqa: BLE001 - not picklable: its text, at least
        _write_message(fd, _RAISED, RuntimeError(f"{type(exc).__name__}: {exc}"))


def _write_message(fd: int, kind: int, value: Any) -> None:
    buffers: list[pickle.PickleBuffer] = []
    metadata = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    views = [buffer.raw() for buffer in buffers]
    header = _HEADER.pack(kind, len(metadata), len(views)) + b"".join(_LENGTH.pack(v.nbytes) for v in views)
    for part in (header, metadata, *views):
        view = memoryview(part).cast("B")
        while view:
            view = view[os.write(fd, view) :]


def _read_exactly(pipe, length: int) -> np.ndarray | None:
    buffer = np.empty(length, np.uint8)  # not bytearray: no pass to zero it first
    view, filled = memoryview(buffer), 0
    while filled < length:
        got = pipe.readinto(view[filled:])
        if not got:
            return None
        filled += got
    return buffer


def _read_message(pipe) -> tuple[int, Any] | None:
    """One message, or None at the end of the pipe (also in the middle of a message: the sender died)."""
    header = pipe.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    kind, metadata_bytes, count = _HEADER.unpack(header)
    lengths_raw = pipe.read(_LENGTH.size * count)
    if len(lengths_raw) < _LENGTH.size * count:
        return None
    metadata = pipe.read(metadata_bytes)
    if len(metadata) < metadata_bytes:
        return None
    buffers = []
    for i in range(count):
        buffer = _read_exactly(pipe, _LENGTH.unpack_from(lengths_raw, i * _LENGTH.size)[0])
        if buffer is None:
            return None
        buffers.append(buffer)
    return kind, pickle.loads(metadata, buffers=buffers)
