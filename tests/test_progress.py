"""The progress line in the job's terms, how often it shows, and the counts behind the Ray metrics."""

from __future__ import annotations

import io
import logging

import pyarrow as pa

from granite_batch.output.summary import RunStats, batch_counts
from granite_batch.run.progress import LOG_INTERVAL_S, Progress, progress_line
from granite_batch.schema import SEGMENT_TYPE


def test_the_line_counts_recordings_failures_hours_speed_and_eta():
    line = progress_line(done=250, total=1000, failed=3, audio_s=5400.0, elapsed_s=60.0)
    assert line == ("250 of 1,000 recordings (25.0%), 3 failed, 1.50 h of audio, RTFx 90, 0:01:00 elapsed, ETA 0:03:00")


def test_before_the_first_recording_the_eta_is_unknown_and_at_the_end_done():
    assert progress_line(0, 10, 0, 0.0, 5.0).endswith("0:00:05 elapsed, ETA ?")
    assert progress_line(10, 10, 1, 36.0, 3725.0).endswith("1:02:05 elapsed, done")


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def stats(rows: int, failed: int = 0, audio_s: float = 0.0) -> RunStats:
    return RunStats(rows_written=rows, rows_ok=rows - failed, rows_failed=failed, audio_s=audio_s)


def test_logs_get_one_line_per_interval(caplog):
    clock = Clock()
    progress = Progress(100, stream=io.StringIO(), clock=clock)
    with caplog.at_level(logging.INFO, logger="granite_batch.run.progress"):
        for step in range(10):  # ten batches within one interval, then one past it
            clock.now += LOG_INTERVAL_S / 20
            progress.update(stats(step + 1))
        clock.now += LOG_INTERVAL_S
        progress.update(stats(20, failed=2, audio_s=720.0))
        progress.close(stats(20, failed=2, audio_s=720.0))
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 3  # the first batch, the one past the interval, the last
    assert lines[0].startswith("progress: 1 of 100 recordings")
    assert lines[1].startswith("progress: 20 of 100 recordings (20.0%), 2 failed, 0.20 h of audio")


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_line_redrawn_in_place():
    clock, screen = Clock(), Terminal()
    progress = Progress(4, stream=screen, clock=clock)
    for done in range(1, 5):
        clock.now += 1.0
        progress.update(stats(done))
    progress.close(stats(4))
    text = screen.getvalue()
    assert text.count("\n") == 1 and text.endswith("done\n")
    assert text.count("\r") == 5  # four updates a second apart, and the closing one


def test_batch_counts_feed_the_metrics():
    segments = pa.array(
        [[{"start": 0.0, "end": 1.0, "text": "a"}, {"start": 1.0, "end": 2.0, "text": "b"}], [], None],
        pa.list_(SEGMENT_TYPE),
    )
    batch = pa.table(
        {
            "error": pa.array([None, None, "decode failed: no audio stream"], pa.string()),
            "duration_s": pa.array([2.0, 0.5, None], pa.float64()),
            "segments": segments,
        }
    )
    assert batch_counts(batch) == {"rows_ok": 2, "rows_failed": 1, "audio_s": 2.5, "segments": 2}
