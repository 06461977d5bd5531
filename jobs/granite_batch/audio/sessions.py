"""Speaker sessions: consecutive calls of one recording that are decoded in order, as one row.

granite-speech-4.1-2b-plus numbers speakers by order of appearance within a call. To keep one numbering
through a recording, transformers' documentation of the model ("Task 4: Incremental decoding",
docs/source/en/model_doc/granite_speech_plus.md) decodes it call after call, each call given the audio
so far and the transcript so far as `prefix_text`. That needs a recording's calls in order on one
actor, where the job otherwise sends each segment on its own. So the segment stage groups the calls of
a recording that asks for speakers into sessions: consecutive calls of one channel whose audio adds up
to at most `max_session_s`, cut greedily (a call that would pass the limit opens the next session).
A session leaves as one SEGMENT row (schema.py): the calls' samples end to end, and `calls`, each
call's sample count and span; the inference stage decodes its calls in order
(inference/transcribe.py). Sessions are planned from the calls alone, so the segment stage and the
decode stage's cutting of long recordings (decode_cut.py), which sees the calls one block at a time,
plan the same sessions.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

# One call: (start, end) sample offsets in the recording, its channel (None: mono) and its samples.
Call = tuple[int, int, int | None, np.ndarray]


@dataclass(frozen=True)
class Sessions:
    """Which recordings are decoded in speaker sessions (`wants`: a recording table -> one bool per
    row, made by the pipeline from the rows' requests) and how much audio one session may hold."""

    wants: Callable[[pa.Table], list[bool]]
    max_session_s: float


class SessionBuilder:
    """Groups a recording's calls, given in order, into sessions of at most `max_samples` samples,
    each of one channel. `add` returns the session a call closed (or None); `flush` the last one."""

    def __init__(self, max_samples: int):
        self.max_samples = max_samples
        self.calls: list[Call] = []
        self.size = 0

    def add(self, call: Call) -> list[Call] | None:
        length = call[1] - call[0]
        closed = None
        if self.calls and (self.size + length > self.max_samples or self.calls[-1][2] != call[2]):
            closed = self.flush()
        self.calls.append(call)
        self.size += length
        return closed

    def flush(self) -> list[Call] | None:
        calls, self.calls, self.size = self.calls, [], 0
        return calls or None


def plan_sessions(calls: list[Call], max_samples: int) -> list[list[Call]]:
    """All of a recording's sessions at once (what SessionBuilder makes of the calls one by one)."""
    builder = SessionBuilder(max_samples)
    sessions = [closed for call in calls if (closed := builder.add(call)) is not None]
    last = builder.flush()
    return sessions + ([last] if last else [])


def session_piece(session: list[Call], sample_rate_hz: int) -> tuple[int, int, int | None, np.ndarray, list[dict]]:
    """A session as one segment: its first start, last end, channel, samples end to end, and its
    `calls` (schema.CALL_TYPE dicts)."""
    samples = np.concatenate([call[3] for call in session]) if len(session) > 1 else session[0][3]
    calls = [
        {"samples": end - start, "start_s": start / sample_rate_hz, "end_s": end / sample_rate_hz}
        for start, end, _, _ in session
    ]
    return session[0][0], session[-1][1], session[0][2], samples, calls
