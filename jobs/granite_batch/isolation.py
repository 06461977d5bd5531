"""Run a stage's native work in a forked child process, so a crash costs one row, not the worker.

A segfault or abort in native code (FFmpeg through PyAV, soxr, torch in the VAD) ends the process it
happens in. In a Ray worker that loses every row of the task, and Ray retries the same task on the
same rows without end: one poison recording stops the job. Here the work runs in a child forked from
the worker; its results come back through a pipe row by row as they are done. When the child dies by
a signal, the rows done before are kept, the row it was working on is retried alone in a fresh child,
and if that child dies too the row gets a `Crash` (the stage makes it an error row:
"decode crashed the worker: signal 11 (SIGSEGV)"); the rows after it go on in another child. The
worker itself never runs the native code, so it never dies of it.

Fork, not spawn: the child starts in a millisecond with the parent's imports, models and memory
(copy-on-write), so the recordings to segment are not copied to it. The child runs only our plain
code (PyAV, numpy, soxr, torch on one thread), never Ray, and leaves with os._exit. Results travel
as pickle protocol 5 with out-of-band buffers: a sample array is written to the pipe from its own
memory and read into the one buffer the parent keeps, one copy in all.

Cost (measured on the 2-core development machine, see README "Failure behaviour"): a few
milliseconds per batch for the fork and the pipe, and about 0.1 s per hour of decoded audio for the
copy back.
"""

from __future__ import annotations

import os
import pickle
import signal as signals
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal, Sequence

import numpy as np

_HEADER = struct.Struct("<BQI")  # kind, metadata bytes, out-of-band buffers
_LENGTH = struct.Struct("<Q")
_RESULT, _RAISED = 1, 2
_PIPE_BYTES = 1 << 20  # a larger pipe: fewer wake-ups while a recording's samples stream back


@dataclass(frozen=True)
class Crash:
    """The work on one item killed its process, also when retried alone in a fresh one."""

    signal: int | None = None
    exit_code: int | None = None

    def reason(self, stage: str) -> str:
        """The error row's text, e.g. "decode crashed the worker: signal 11 (SIGSEGV)"."""
        if self.signal is not None:
            try:
                name = f" ({signals.Signals(self.signal).name})"
            except ValueError:
                name = ""
            return f"{stage} crashed the worker: signal {self.signal}{name}"
        return f"{stage} crashed the worker: exit status {self.exit_code}"


@dataclass(frozen=True)
class CrashTest:
    """Test only: the process working on the row whose `audio` equals `audio` in `stage` kills
    itself with `signal`, as a native crash would. Given to a stage as an argument, never set in
    production (JobConfig's `crash_test`)."""

    stage: Literal["decode", "segment", "model"]
    audio: str
    signal: int = int(signals.SIGSEGV)

    def check(self, stage: str, audio: Sequence[str | None]) -> None:
        """Kill this process if `stage` is the one to crash and `audio` holds the chosen row."""
        if stage == self.stage and self.audio in audio:
            os.kill(os.getpid(), self.signal)


def can_fork() -> bool:
    """Whether this platform forks safely (Linux); elsewhere the work runs in the worker itself."""
    return hasattr(os, "fork") and os.uname().sysname == "Linux"


def map_isolated(fn: Callable[[Any], Any], items: Sequence[Any], isolate: bool = True) -> list[Any]:
    """`[fn(item) for item in items]`, computed in forked children. An item whose `fn` kills its
    process, twice (in the batch, then alone in a fresh child), gives a `Crash` in its place; the
    other items' results are the same as without isolation. An exception `fn` raises is raised here.
    """
    if not isolate or not can_fork():
        return [fn(item) for item in items]
    results: list[Any] = [None] * len(items)
    start = 0
    while start < len(items):
        done, crash = _run_in_child(lambda first=start: (fn(item) for item in items[first:]))
        results[start:start + len(done)] = done
        start += len(done)
        if crash is None:
            break
        # The child died on items[start]: once more alone, so a crash its neighbours caused, or a
        # transient one, does not fail it.
        alone, crash = _run_in_child(lambda item=items[start]: iter([fn(item)]))
        results[start] = alone[0] if crash is None else crash
        start += 1
    return results


def call_isolated(fn: Callable[[list], list], items: Sequence[Any], isolate: bool = True) -> list[Any]:
    """`fn(items)` for an `fn` that works on a whole batch at once and returns one result per item,
    computed in a forked child. If the child dies, each item is redone alone (`map_isolated` of
    `fn([item])[0]`), so only the items that crash on their own get a `Crash`."""
    if not isolate or not can_fork():
        return fn(list(items))
    done, crash = _run_in_child(lambda: iter([fn(list(items))]))
    if crash is None:
        return done[0]
    return map_isolated(lambda item: fn([item])[0], items)


def _run_in_child(results: Callable[[], Iterator[Any]]) -> tuple[list[Any], Crash | None]:
    """Run `results()` in a forked child and collect what it yields, in order, until it ends
    (Crash None) or its process dies (the results sent before, and how it died)."""
    read_fd, write_fd = os.pipe()
    try:
        import fcntl

        fcntl.fcntl(write_fd, fcntl.F_SETPIPE_SZ, _PIPE_BYTES)
    except (ImportError, AttributeError, OSError):
        pass  # a smaller pipe only means more round trips
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_fd)
        _child(results, write_fd)
    os.close(write_fd)
    done: list[Any] = []
    raised: BaseException | None = None
    with os.fdopen(read_fd, "rb", buffering=_PIPE_BYTES) as pipe:
        while True:
            message = _read_message(pipe)
            if message is None:
                break
            kind, value = message
            if kind == _RAISED:
                raised = value
                break
            done.append(value)
    _, status = os.waitpid(pid, 0)
    if raised is not None:
        raise raised
    if os.WIFSIGNALED(status):
        return done, Crash(signal=os.WTERMSIG(status))
    code = os.waitstatus_to_exitcode(status)
    return done, (None if code == 0 else Crash(exit_code=code))


def _child(results: Callable[[], Iterator[Any]], write_fd: int) -> None:
    code = 0
    try:
        for result in results():
            _write_message(write_fd, _RESULT, result)
    except BaseException as exc:  # noqa: BLE001 - the parent raises it as its own
        code = 1
        try:
            _write_message(write_fd, _RAISED, exc)
        except Exception:  # noqa: BLE001 - not picklable: its text, at least
            try:
                _write_message(write_fd, _RAISED, RuntimeError(f"{type(exc).__name__}: {exc}"))
            except BaseException:  # noqa: BLE001
                pass
    finally:
        os._exit(code)  # no atexit handlers, no flushing of the parent's buffers, no Ray shutdown


def _write_message(fd: int, kind: int, value: Any) -> None:
    buffers: list[pickle.PickleBuffer] = []
    metadata = pickle.dumps(value, protocol=5, buffer_callback=buffers.append)
    views = [buffer.raw() for buffer in buffers]
    header = _HEADER.pack(kind, len(metadata), len(views)) + b"".join(_LENGTH.pack(v.nbytes) for v in views)
    for part in (header, metadata, *views):
        view = memoryview(part).cast("B")
        while view:
            view = view[os.write(fd, view):]


def _read_message(pipe) -> tuple[int, Any] | None:
    """One message, or None at the end of the pipe (also in the middle of a message: the child died)."""
    header = pipe.read(_HEADER.size)
    if len(header) < _HEADER.size:
        return None
    kind, metadata_bytes, count = _HEADER.unpack(header)
    lengths_raw = pipe.read(_LENGTH.size * count)
    if len(lengths_raw) < _LENGTH.size * count:
        return None
    lengths = [_LENGTH.unpack_from(lengths_raw, i * _LENGTH.size)[0] for i in range(count)]
    metadata = pipe.read(metadata_bytes)
    if len(metadata) < metadata_bytes:
        return None
    buffers = []
    for length in lengths:
        buffer = np.empty(length, np.uint8)  # not bytearray: no pass to zero it first
        view, filled = memoryview(buffer), 0
        while filled < length:
            got = pipe.readinto(view[filled:])
            if not got:
                return None
            filled += got
        buffers.append(buffer)
    return kind, pickle.loads(metadata, buffers=buffers)
