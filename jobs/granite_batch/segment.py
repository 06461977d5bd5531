"""Split a long recording into segments the model can take in one pass.

Granite Speech is trained on short utterances, so a recording longer than `max_segment_s` is cut
into consecutive pieces no longer than that. Each cut falls at the quietest short frame in the
second half of the allowed window, which puts it in a pause rather than mid-word when there is one.
A recording no longer than the limit stays whole.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from granite_batch.audio import samples_from_arrow

FRAME_S = 0.02


def plan_segments(samples: np.ndarray, sample_rate_hz: int, max_segment_s: float) -> list[tuple[int, int]]:
    """Return (start, end) sample offsets that tile the recording, each at most `max_segment_s` long."""
    n = len(samples)
    max_len = int(max_segment_s * sample_rate_hz)
    if n <= max_len:
        return [(0, n)]
    frame = max(1, int(FRAME_S * sample_rate_hz))
    bounds: list[tuple[int, int]] = []
    start = 0
    while n - start > max_len:
        window_start = start + max_len // 2
        window = samples[window_start : start + max_len]
        usable = (len(window) // frame) * frame
        energy = np.square(window[:usable], dtype=np.float64).reshape(-1, frame).mean(axis=1)
        # Latest among the quietest frames keeps segments long; cut in the middle of that frame.
        quietest = len(energy) - 1 - int(np.argmin(energy[::-1]))
        cut = window_start + quietest * frame + frame // 2
        bounds.append((start, cut))
        start = cut
    bounds.append((start, n))
    return bounds


def segment_table(table: pa.Table, sample_rate_hz: int, max_segment_s: float) -> pa.Table:
    """Segment stage: add `segment_starts` / `segment_ends` (sample offsets) for each decoded row."""
    starts: list[list[int] | None] = []
    ends: list[list[int] | None] = []
    for samples in samples_from_arrow(table.column("samples")):
        if samples is None:
            starts.append(None)
            ends.append(None)
            continue
        bounds = plan_segments(samples, sample_rate_hz, max_segment_s)
        starts.append([b[0] for b in bounds])
        ends.append([b[1] for b in bounds])
    table = table.append_column("segment_starts", pa.array(starts, pa.list_(pa.int64())))
    return table.append_column("segment_ends", pa.array(ends, pa.list_(pa.int64())))
