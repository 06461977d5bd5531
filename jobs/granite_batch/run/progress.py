"""The run's progress in its own terms: recordings done of total, failures, audio hours, speed, ETA.

In a terminal one line is redrawn in place; in logs (not a TTY: `ray job submit`, a scheduler) one
line is logged every `LOG_INTERVAL_S`, in place of Ray Data's per-operator bars, which the driver
turns off (they name internal operators and print a block of lines every few seconds).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable
from typing import TextIO

from granite_batch.output.summary import RunStats

log = logging.getLogger(__name__)

LOG_INTERVAL_S = 30.0  # one progress line this often in logs
TTY_INTERVAL_S = 0.5  # a terminal's line is redrawn this often at most


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


def progress_line(done: int, total: int, failed: int, audio_s: float, elapsed_s: float) -> str:
    """`120 of 1,000 recordings (12.0%), 3 failed, 1.50 h of audio, RTFx 450, 0:02:00 elapsed, ETA 0:14:40`:
    the ETA assumes the rest goes at the pace so far (`?` before the first recording)."""
    share = f" ({done / total:.1%})" if total else ""
    parts = [f"{done:,} of {total:,} recordings{share}", f"{failed:,} failed", f"{audio_s / 3600:.2f} h of audio"]
    if elapsed_s > 0 and audio_s > 0:
        parts.append(f"RTFx {audio_s / elapsed_s:.0f}")
    parts.append(f"{_clock(elapsed_s)} elapsed")
    if done >= total:
        parts.append("done")
    else:
        parts.append(f"ETA {_clock(elapsed_s / done * (total - done))}" if done else "ETA ?")
    return ", ".join(parts)


class Progress:
    """Shows a run's `RunStats` against its `total` recordings, at most once per interval; `stream`
    and `clock` are arguments for tests."""

    def __init__(
        self,
        total: int,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
        interval_s: float | None = None,
    ):
        self.total = total
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval_s = interval_s if interval_s is not None else (TTY_INTERVAL_S if self.tty else LOG_INTERVAL_S)
        self.clock = clock
        self.started = clock()
        self.shown_at: float | None = None
        self.last = ""

    def update(self, stats: RunStats, force: bool = False) -> None:
        now = self.clock()
        if not force and self.shown_at is not None and now - self.shown_at < self.interval_s:
            return
        self.shown_at = now
        self.last = progress_line(stats.rows_written, self.total, stats.rows_failed, stats.audio_s, now - self.started)
        if self.tty:
            self.stream.write("\r\033[K" + self.last)
            self.stream.flush()
        else:
            log.info("progress: %s", self.last)

    def close(self, stats: RunStats) -> None:
        """The last line, whatever the interval; a terminal's line is ended."""
        self.update(stats, force=True)
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()
