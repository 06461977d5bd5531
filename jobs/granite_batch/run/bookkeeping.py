"""One run's bookkeeping on the driver: its id, its summary, its staging and its result."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa

from granite_batch.config import ConfigError
from granite_batch.models.hub import first_line
from granite_batch.output.summary import write_summary
from granite_batch.output.writer import TranscriptWriter
from granite_batch.run.lease import LeaseTerms, NoLease, take_lease
from granite_batch.storage import OutputRoot

log = logging.getLogger(__name__)


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises KeyboardInterrupt, so a run stops the same way on both."""

    def __init__(self, signal_number: int = signal.SIGTERM):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


class _Deferral:
    """Whether a batch is being counted and written right now, and a signal that came meanwhile."""

    active = False
    pending: int | None = None


_DEFERRAL = _Deferral()


def on_interrupt(number: int, frame) -> None:
    """Signal handler for SIGINT and SIGTERM: stop the run now, or, while a batch is being counted and
    written, right after it, so the summary's counts are exactly the rows committed."""
    if _DEFERRAL.active:
        _DEFERRAL.pending = number
        return
    raise Interrupted(number)


@contextlib.contextmanager
def interrupts_deferred():
    """Hold an interrupt that arrives inside this block until its end."""
    _DEFERRAL.active, _DEFERRAL.pending = True, None
    try:
        yield
    finally:
        _DEFERRAL.active = False
    if _DEFERRAL.pending is not None:
        number, _DEFERRAL.pending = _DEFERRAL.pending, None
        raise Interrupted(number)


def interrupt_signal(error: BaseException) -> int:
    """The signal that stopped a run: SIGTERM for Interrupted, SIGINT for a plain KeyboardInterrupt."""
    return error.signal_number if isinstance(error, Interrupted) else signal.SIGINT


class TooManyFailures(RuntimeError):
    """More rows failed than `max_failed_fraction` allows; the summary is written all the same."""


@dataclass
class RunResult:
    run_id: str
    summary: dict
    summary_path: str
    files: list[str]


def new_run_id() -> str:
    """Sortable by start time, unique across concurrent runs."""
    return datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


class _Run:
    """One run's bookkeeping, the same for every driver: its summary file and the batch loop.

    `summary(status)` builds the summary dict from the driver's own counters; it is written with
    `running` when the run starts and after every file it commits, then with the final status. A
    run stopped by an error writes `failed` with the error's first line before the error goes on.
    """

    def __init__(self, output: OutputRoot, runs_dir: str, run_id: str | None):
        self.output = output
        self.runs_dir = runs_dir
        self.run_id = run_id or new_run_id()
        self.started_at = datetime.now(UTC)
        self.clock = time.monotonic()
        self.summary: Callable[[str], dict] | None = None
        self.last: dict = {}
        self.lease = NoLease(output.uri)  # the dataset's lease once taken; released when the run ends
        self._refuse_existing_run_id()

    def _refuse_existing_run_id(self) -> None:
        if self.output.fs.exists(self.output.join(self.runs_dir, f"{self.run_id}.json")):
            # Its files are named after the run id: a second run of that name would replace them.
            raise ConfigError(
                f"run id {self.run_id!r} already exists in {self.output.uri}; pick another --run-id "
                "(or leave it out for a new one)"
            )

    def wall_s(self) -> float:
        return time.monotonic() - self.clock

    def times(self, status: str) -> dict:
        return {
            "run_id": self.run_id,
            "status": status,
            "started_at": self.started_at.isoformat(),
            "finished_at": datetime.now(UTC).isoformat() if status != "running" else None,
        }

    def write(self, status: str, **extra) -> str:
        """Write the summary with `status` (and `extra` fields); it stays in `self.last`."""
        self.last = {**self.summary(status), **extra}
        return write_summary(self.output, self.run_id, self.last, runs_dir=self.runs_dir)

    def stream(
        self, batches: Iterable[pa.Table], writer: TranscriptWriter, on_batch: Callable[[pa.Table], None]
    ) -> None:
        """Write every batch (after `on_batch` has seen it); the summary follows each commit."""
        for batch in batches:
            with interrupts_deferred():  # counted and written together, or neither
                on_batch(batch)
                files_before = len(writer.committed)
                writer.write(batch)
                if len(writer.committed) != files_before:
                    self.write("running")

    def __enter__(self) -> _Run:
        # A summary exists from the start, so a run killed at any moment still shows what it did.
        self.write("running")
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if error is not None and self.summary is not None:
                try:
                    if isinstance(error, KeyboardInterrupt):  # Ctrl-C or SIGTERM: what is committed stays
                        self.write("interrupted", signal=signal.Signals(interrupt_signal(error)).name)
                    else:
                        self.write("failed", error=f"{kind.__name__}: {first_line(error)}")
                except Exception:  # the output itself may be what failed; the original error matters more
                    log.warning("could not record the failure in the run summary", exc_info=True)
        finally:
            self.lease.release()

    def plan(self, dataset_dir: str, terms: LeaseTerms, planner: Callable[[], object]):
        """Take the lease on the dataset this run writes (held until the run ends; waits for or
        raises LeaseHeld naming another holder), then plan what is left to do: `planner()`."""
        self.lease = take_lease(self.output, dataset_dir, self.run_id, terms)
        # The run starts now: time spent waiting for the lease is not its wall time.
        self.started_at, self.clock = datetime.now(UTC), time.monotonic()
        try:
            self._refuse_existing_run_id()  # a run of the same id may have held the lease meanwhile
            return planner()
        except BaseException:
            self.lease.release()
            raise
