"""A long recording cut as it is decoded: VAD groups as their audio arrives, the plan
remade over what is known, segments that nothing later can change sent on.
"""

from __future__ import annotations

import bisect

import numpy as np

from granite_batch.audio.isolation import CrashTest
from granite_batch.audio.segment import _cut_long, _merge, _padded
from granite_batch.audio.vad import (
    VAD_FRAME,
    VAD_RATE_HZ,
    VadOptions,
    _group_probabilities,
    scatter_probabilities,
    speech_regions,
    window_samples,
)


class _Tail:
    """The samples of a recording from `start` to `end` (offsets in the whole recording), kept as the
    decoder's pieces, and sliced with offsets in the whole recording (what window_samples and
    _cut_point take: `len()` is `end`)."""

    def __init__(self):
        self.pieces: list[np.ndarray] = []
        self.starts: list[int] = []
        self.start = self.end = 0

    def __len__(self) -> int:
        return self.end

    def append(self, piece: np.ndarray) -> None:
        self.pieces.append(piece)
        self.starts.append(self.end)
        self.end += len(piece)

    def __getitem__(self, key: slice) -> np.ndarray:
        low = max(key.start or 0, 0)
        high = self.end if key.stop is None else min(key.stop, self.end)
        if low < self.start:
            raise IndexError(f"samples from {low} were let go (kept from {self.start})")
        if high <= low:
            return np.zeros(0, np.float32)
        first = bisect.bisect_right(self.starts, low) - 1
        parts = []
        for k in range(first, len(self.pieces)):
            if self.starts[k] >= high:
                break
            offset = self.starts[k]
            parts.append(self.pieces[k][max(low - offset, 0) : high - offset])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def forget_before(self, offset: int) -> None:
        """Let go of the pieces that end at or before `offset`."""
        drop = bisect.bisect_right(self.starts, offset) - 1
        if drop > 0:
            del self.pieces[:drop], self.starts[:drop]
            self.start = self.starts[0]


class StreamCut:
    """The segments of one long mono recording (at least `long_recording_s`), planned as it is
    decoded, the same as `plan_segments` gives for the whole recording (tested).

    Its VAD windows are all `max_window_s` long (a recording this long gets no other), so a group of
    `batch_windows` of them runs as soon as its audio has arrived, the same groups as for the whole
    recording. After each group the plan is made again over what is known, and the segments that
    nothing later can change are given out: those that end `margin` before the known audio does (a
    segment's end depends on speech up to `max_segment_s` + `max_merge_gap_s` + padding later:
    merging, padding halfway into the next pause, silero's end of speech). silero's region rule is
    run again only from the start of its last closed region (where its state is idle), so the plan
    costs little more than for the whole recording. What is held: the audio not yet cut (one group,
    1,024 s, and the margin), and one probability per 32 ms frame.
    """

    def __init__(
        self,
        sample_rate_hz: int,
        max_segment_s: float,
        options: VadOptions,
        crash_test: CrashTest | None,
        audio: str | None,
    ):
        if sample_rate_hz != VAD_RATE_HZ:
            raise ValueError(f"segmentation needs {VAD_RATE_HZ} Hz samples, not {sample_rate_hz}")
        self.options, self.crash_test, self.audio = options, crash_test, audio
        self.max_len = int(max_segment_s * sample_rate_hz)
        self.max_gap = int(options.max_merge_gap_s * sample_rate_hz)
        self.pad = int(options.pad_s * sample_rate_hz)
        self.margin = (
            self.max_len
            + self.max_gap
            + 2 * self.pad
            + int((options.min_speech_s + options.min_silence_s + 1.0) * sample_rate_hz)
        )
        self.window = round(options.max_window_s * VAD_RATE_HZ / VAD_FRAME)
        self.tail = _Tail()
        self.probs = np.zeros(0, np.float32)
        self.regions: list[tuple[int, int]] = []  # silero's regions before frame `restart`
        self.restart = 0
        self.emitted_end = 0
        self.keep_from = 0

    def add(self, piece: np.ndarray) -> None:
        self.tail.append(piece)

    def ready(self) -> bool:
        """Whether the audio of the next group of windows has arrived."""
        return self.tail.end >= (len(self.probs) + self.options.batch_windows * self.window) * VAD_FRAME

    def step(self, final: bool = False) -> list[tuple[int, int]]:
        """Run the groups whose audio has arrived (with `final`, the rest of the recording too) and
        return the segments that became final, in order."""
        while self.ready():
            first = len(self.probs)
            self._group(
                [
                    (0, f, self.window)
                    for f in range(first, first + self.options.batch_windows * self.window, self.window)
                ]
            )
        count = -(-self.tail.end // VAD_FRAME)
        if final and len(self.probs) < count:
            self._group([(0, f, min(self.window, count - f)) for f in range(len(self.probs), count, self.window)])
        known = self.tail.end if final else len(self.probs) * VAD_FRAME
        offset = self.restart * VAD_FRAME
        fresh = (
            [
                (start + offset, end + offset)
                for start, end in speech_regions(self.probs[self.restart :], known - offset, self.options)
            ]
            if self.options.vad
            else [(0, known)]  # speech everywhere (VadOptions.vad)
        )
        regions = self.regions + fresh
        closed = [r for r in fresh if final or r[1] < known]  # a region still open ends at `known`
        if closed and not final:  # silero's state is idle where a region starts: run again from the last closed one
            last = closed[-1]
            self.regions += fresh[: fresh.index(last)]
            self.restart = last[0] // VAD_FRAME
        pieces: list[tuple[int, int]] = []
        for start, end in _padded(regions, known, self.pad) if regions else []:
            if end > self.emitted_end:
                pieces.extend(
                    _cut_long(
                        self.tail,
                        max(start, self.emitted_end),
                        end,
                        self.max_len,
                        VAD_RATE_HZ,
                        self.probs,
                        self.options,
                    )
                )
        merged = _merge(pieces, self.max_len, self.max_gap) if pieces else []
        horizon = known if final else known - self.margin
        done = [segment for segment in merged if segment[1] <= horizon]
        if done:
            self.emitted_end = done[-1][1]
        waiting = [segment[0] for segment in merged[len(done) :]]
        self.keep_from = max(self.emitted_end, min(waiting + [known - self.margin]))
        return done

    def samples(self, start: int, end: int) -> np.ndarray:
        return np.array(self.tail[start:end], np.float32)

    def forget(self) -> None:
        """Let go of the audio that no segment still to come can hold."""
        self.tail.forget_before(self.keep_from)

    def _group(self, windows: list[tuple[int, int, int]]) -> None:
        end = windows[-1][1] + windows[-1][2]
        if not self.options.vad:  # speech everywhere (VadOptions.vad)
            self.probs = np.concatenate([self.probs, np.ones(end - len(self.probs), np.float32)])
            return
        computed = _group_probabilities(
            (window_samples([self.tail], windows, self.options), [self.audio]), self.options, self.crash_test
        )
        self.probs = np.concatenate([self.probs, np.zeros(end - len(self.probs), np.float32)])
        scatter_probabilities([self.probs], windows, computed)
