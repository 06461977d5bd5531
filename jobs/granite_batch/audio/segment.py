"""Find the speech in a recording and cut it into segments the model can take in one pass.

Silero VAD gives a speech probability for every 32 ms frame. Frames above `threshold` start speech
and frames below `neg_threshold` end it (silero's own rule, `speech_regions`); speech regions get
`pad_s` of context on each side, and neighbouring regions are merged into segments of at most
`max_segment_s`. Speech that runs on longer
than that is cut in the longest pause (VAD probability, then energy) of the second half of each
window, so a cut falls between words, not inside one. Silence outside every segment is dropped.

A recording no longer than `max_segment_s` that holds any speech stays whole (one segment); one
with no speech, or too short to hold a word, has no segment.

Without the VAD (`VadOptions.vad` False: the CTC models' default, config `segmentation`), every
recording is all speech to this plan: kept whole up to `max_segment_s` (silent or not), cut beyond
that in the longest run of quiet 10 ms frames (energy alone) of the second half of each window, and
nothing is dropped: the segments tile the recording.

Memory: the VAD works through a recording one group of windows at a time (`batch_windows` windows
of at most 16 s, side by side: 68 MB of samples), and that group is all the helper process it runs in
receives (isolation.py: a crash in it costs one row, not the worker), so neither holds a copy of a
long recording; besides, one float per 32 ms frame. Segment rows leave in tables of about 64 MB of
samples (`segment_blocks`). A recording of at least `long_recording_s` (17 minutes) is decoded and
cut in one helper process as it is decoded (decode_cut.py, `StreamCut`), which sends back its
segments a table at a time: no process holds it whole (the helper holds one group of windows and the
speech not yet cut; a recording with split channels is held whole while it is cut, 64 KB per audio
second and channel). Speed: the windows of every recording in a batch run side by side.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from granite_batch.audio.decode import samples_from_arrow, samples_to_arrow
from granite_batch.audio.isolation import Crash, CrashTest
from granite_batch.audio.sessions import Sessions, plan_sessions, session_piece
from granite_batch.audio.vad import (
    PAUSE_DB,
    PAUSE_FRAME_S,
    VAD_FRAME,
    VAD_RATE_HZ,
    VadOptions,
    _vad,
    speech_probabilities,
    speech_regions,
    warm_vad,
)
from granite_batch.schema import END, SEGMENT, SEGMENT_COLUMNS, WHOLE, segment_rows

# Segment rows leave the segment stage in tables of about this many bytes of samples (17 minutes).
SEGMENT_BLOCK_BYTES = 64 << 20
# What becomes one segment row: (start, end) sample offsets in the recording, channel, its samples,
# and its calls when it is a speaker session (sessions.py; else None).
Piece = tuple[int, int, int | None, np.ndarray, list[dict] | None]


def plan_segments(
    samples: np.ndarray,
    sample_rate_hz: int,
    max_segment_s: float,
    options: VadOptions = VadOptions(),
    probabilities: np.ndarray | None = None,
) -> list[tuple[int, int]]:
    """(start, end) sample offsets of the speech segments, in order, each at most `max_segment_s`.

    A recording no longer than the limit that holds speech is one segment (0, len(samples));
    a recording without speech gives no segment. `probabilities`, when given, are the recording's
    `speech_probabilities` already computed (with other recordings').
    """
    if sample_rate_hz != VAD_RATE_HZ:
        raise ValueError(f"segmentation needs {VAD_RATE_HZ} Hz samples, not {sample_rate_hz}")
    n = len(samples)
    if n < options.min_speech_s * sample_rate_hz:
        return []
    if probabilities is None:
        probabilities = speech_probabilities(samples, options)
    regions = speech_regions(probabilities, n, options) if options.vad else [(0, n)]
    if not regions:
        return []
    max_len = int(max_segment_s * sample_rate_hz)
    if n <= max_len:
        return [(0, n)]
    pieces: list[tuple[int, int]] = []
    for start, end in _padded(regions, n, int(options.pad_s * sample_rate_hz)):
        pieces.extend(_cut_long(samples, start, end, max_len, sample_rate_hz, probabilities, options))
    return _merge(pieces, max_len, int(options.max_merge_gap_s * sample_rate_hz))


def _padded(regions: list[tuple[int, int]], n: int, pad: int) -> list[tuple[int, int]]:
    """Regions widened by `pad`, but never past the middle of the pause to the next one."""
    padded = []
    for i, (start, end) in enumerate(regions):
        low = 0 if i == 0 else (regions[i - 1][1] + start) // 2
        high = n if i == len(regions) - 1 else (end + regions[i + 1][0]) // 2
        padded.append((max(low, start - pad), min(high, end + pad)))
    return padded


def _cut_long(
    samples: np.ndarray,
    start: int,
    end: int,
    max_len: int,
    sample_rate_hz: int,
    probabilities: np.ndarray,
    options: VadOptions,
) -> list[tuple[int, int]]:
    """Cut [start, end) into pieces of at most `max_len`, each cut in the longest pause of the
    second half of its window (`_cut_point`), so pieces stay long and words stay whole."""
    pieces = []
    while end - start > max_len:
        cut = _cut_point(samples, start + max_len // 2, start + max_len, sample_rate_hz, probabilities, options)
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def _cut_point(
    samples: np.ndarray, low: int, high: int, sample_rate_hz: int, probabilities: np.ndarray, options: VadOptions
) -> int:
    """Where to cut speech inside [low, high): in its longest pause.

    A 10 ms frame is a pause when the VAD calls it non-speech (probability below `neg_threshold`) or
    its energy is `PAUSE_DB` below the window's median frame (a gap between words: silero's
    probability barely dips in gaps under 100 ms, so energy finds most of them). The longest run of
    pause frames wins (then the one the VAD is surest of, then the latest), as silero's own splitter
    prefers pauses of 98 ms or more over cutting at its limit; the cut is at the run's quietest frame.
    With no pause at all (noise, music under speech) the cut is at the frame of least speech
    probability, then least energy. Without the VAD (`options.vad` False) a pause is energy alone and
    the cut is at its middle frame; a frame within 10 dB of the window's quietest is a pause too (over
    a noise floor, 35 dB below the median may be no frame at all).
    """
    frame = max(1, int(PAUSE_FRAME_S * sample_rate_hz))
    count = (high - low) // frame
    if count < 1:
        return high
    energy = np.square(samples[low : low + count * frame], dtype=np.float64).reshape(count, frame).mean(axis=1)
    centres = low + np.arange(count) * frame + frame // 2
    speech = probabilities[np.minimum(centres // VAD_FRAME, len(probabilities) - 1)]
    quiet_level = np.median(energy) * 10 ** (-PAUSE_DB / 10)
    if not options.vad:  # no VAD to see pauses over a noise floor: within 10 dB of the window's quietest frame
        quiet_level = max(quiet_level, 10 * energy.min())
    pause = (speech < options.neg_threshold) | (energy <= quiet_level)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], pause.astype(np.int8), [0]))))
    runs = edges.reshape(-1, 2)
    if len(runs):
        first, last = max(runs.tolist(), key=lambda run: (run[1] - run[0], -speech[run[0] : run[1]].mean(), run[0]))
        if not options.vad:  # energy alone: the pause's middle, as far from both words as it gets
            return int(centres[(first + last) // 2])
    else:
        first, last = 0, count
    # Least speech probability, then least energy, then nearest the pause's middle.
    order = np.lexsort(
        (np.abs(np.arange(first, last) - (first + last - 1) / 2), energy[first:last], speech[first:last])
    )
    return int(centres[first + order[0]])


def _merge(pieces: list[tuple[int, int]], max_len: int, max_gap: int) -> list[tuple[int, int]]:
    """Join consecutive pieces while the result stays within `max_len` and no pause exceeds `max_gap`."""
    segments = [pieces[0]]
    for start, end in pieces[1:]:
        first, last = segments[-1]
        if end - first <= max_len and start - last <= max_gap:
            segments[-1] = (first, end)
        else:
            segments.append((start, end))
    return segments


def segment_table(
    table: pa.Table,
    sample_rate_hz: int,
    max_segment_s: float,
    options: VadOptions = VadOptions(),
    isolate: bool = True,
    crash_test: CrashTest | None = None,
) -> pa.Table:
    """`segment_blocks` as one table."""
    blocks = list(segment_blocks(table, sample_rate_hz, max_segment_s, options, isolate, crash_test))
    return pa.concat_tables(blocks) if len(blocks) > 1 else blocks[0]


def segment_blocks(
    table: pa.Table,
    sample_rate_hz: int,
    max_segment_s: float,
    options: VadOptions = VadOptions(),
    isolate: bool = True,
    crash_test: CrashTest | None = None,
    block_bytes: int = SEGMENT_BLOCK_BYTES,
    sessions: Sessions | None = None,
):
    """Segment stage: decoded recordings in, one row per speech segment out, in tables of about
    `block_bytes` of samples each (Ray Data gathers them into blocks up to its own target size,
    128 MB, and stores each block as it fills), so the worker never builds a long recording's
    segment rows all at once.

    The rows are schema.segment_rows (schema.py declares them). Each segment row (`row_kind`
    SEGMENT) carries its recording's columns (all but `samples`), `segment_index` (0-based),
    `segment_count` (the recording's), `start_s` / `end_s`, `channel` and the segment's own
    `samples`, at most `max_segment_s` long: what leaves this stage is bounded however long the
    recording. A recording decoded with its channels split (`channel_count` set, audio.decode_table)
    is segmented channel by channel; its segments carry their `channel` and are numbered in time
    order over all channels (then by channel), so a silent channel costs its VAD and nothing more;
    `channel` is null for mono recordings. A recording with no segment (an error, silence, too short
    to hold speech) gives one END row with `segment_count` 0 and no samples, so every recording
    still reaches the driver. The VAD runs over all the recordings (and channels) of the table at once, so
    short clips run side by side. With `isolate` it runs in a helper process (isolation.py), one
    group of windows at a time: a recording that crashes it becomes an error row ("segment crashed
    the worker: signal 11 (SIGSEGV)"). Segments are then planned here from the probabilities (numpy
    only). Rows `decode_cut.decode_blocks` already cut (all but its WHOLE rows) pass through as they are.
    With `sessions`, the segments of each recording it wants are grouped into speaker sessions
    (sessions.py): one SEGMENT row per session, numbered and counted as sessions.
    `crash_test` is for tests only.
    """
    if "row_kind" in table.column_names:  # from decode_blocks: long recordings come already cut
        whole = pc.equal(table.column("row_kind"), WHOLE)
        to_cut = pc.sum(whole).as_py() or 0
        if to_cut == 0 and table.num_rows:
            yield _output_columns(table)
            return
        if to_cut < table.num_rows:
            yield _output_columns(table.filter(pc.invert(whole)))
        table = table.filter(whole).drop_columns(list(SEGMENT_COLUMNS))
    recordings = samples_from_arrow(table.column("samples"))
    n = table.num_rows
    audio = table.column("audio").to_pylist() if "audio" in table.column_names else [None] * n
    errors = table.column("error").to_pylist() if "error" in table.column_names else [None] * n
    channel_counts = table.column("channel_count").to_pylist() if "channel_count" in table.column_names else [None] * n
    bounds_of = plan_recordings(
        recordings, channel_counts, audio, errors, sample_rate_hz, max_segment_s, options, isolate, crash_test
    )
    base = table.drop_columns([c for c in ("samples", "error", "channel_count") if c in table.column_names])
    base = base.append_column("error", pa.array(errors, pa.string()))
    wants = sessions.wants(base) if sessions is not None else [False] * n
    block: list[tuple[int, int | None, int, Piece | None]] = []
    size = 0
    for row in range(n):
        bounds = bounds_of.get(row, [])
        if not bounds:  # an END row all the same, so the recording reaches the driver
            block.append((row, None, 0, None))
        calls = [(a, b, channel, samples[a:b]) for a, b, channel, samples in bounds]
        pieces: list[Piece] = [(*call, None) for call in calls]
        if wants[row] and sessions is not None and calls:
            pieces = [
                session_piece(session, sample_rate_hz)
                for session in plan_sessions(calls, int(sessions.max_session_s * sample_rate_hz))
            ]
        for k, piece in enumerate(pieces):
            block.append((row, k, len(pieces), piece))
            size += 4 * len(piece[3])
            if size >= block_bytes:
                yield _segment_block(base, block, sample_rate_hz)
                block, size = [], 0
    if block or n == 0:
        yield _segment_block(base, block, sample_rate_hz)


def plan_recordings(
    recordings: list[np.ndarray | None],
    channel_counts: list[int | None],
    audio: list[str | None],
    errors: list[str | None],
    sample_rate_hz: int,
    max_segment_s: float,
    options: VadOptions,
    isolate: bool,
    crash_test: CrashTest | None,
) -> dict[int, list[tuple[int, int, int | None, np.ndarray]]]:
    """The segments of each recording, {row: [(start, end, channel, the samples they index)]}, in
    time order over its channels (then by channel); the VAD runs over all of them at once. A
    recording whose VAD crashes gets its `errors` entry and no segment."""
    # One unit of VAD work per mono recording, or per channel of a split one: (row, channel, samples).
    units: list[tuple[int, int | None, np.ndarray]] = []
    for row, samples in enumerate(recordings):
        if samples is None:
            continue
        if channel_counts[row] is None:
            units.append((row, None, samples))
            continue
        length = len(samples) // channel_counts[row]
        units.extend((row, c, samples[c * length : (c + 1) * length]) for c in range(channel_counts[row]))
    # Too short to hold a word: no VAD, no segment.
    units = [unit for unit in units if len(unit[2]) >= options.min_speech_s * sample_rate_hz]
    if isolate and units and options.vad:
        warm_vad()  # before the helper is forked, so that it starts warm
    probabilities = _vad(
        [samples for _, _, samples in units], [audio[row] for row, _, _ in units], options, isolate, crash_test
    )
    bounds_of: dict[int, list[tuple[int, int, int | None, np.ndarray]]] = {}
    for (row, channel, samples), probs in zip(units, probabilities):
        if isinstance(probs, Crash):
            errors[row] = probs.reason("segment")
        elif errors[row] is None:
            bounds = plan_segments(samples, sample_rate_hz, max_segment_s, options, probs)
            bounds_of.setdefault(row, []).extend((start, end, channel, samples) for start, end in bounds)
    for row, bounds in bounds_of.items():
        if errors[row] is not None:  # one channel crashed the VAD: the recording fails whole
            bounds.clear()
        bounds.sort(key=lambda bound: (bound[0], bound[2] or 0))
    return bounds_of


def _output_columns(table: pa.Table) -> pa.Table:
    """Segment rows from decode_cut.decode_blocks in segment_blocks' column order: the recording's, `error`,
    SEGMENT_COLUMNS, `samples`."""
    last = ["error", *SEGMENT_COLUMNS, "samples"]
    return table.select([c for c in table.column_names if c not in last and c != "channel_count"] + last)


def long_recording_s(options: VadOptions = VadOptions()) -> float:
    """Recordings at least this long (one full group of VAD windows: 1,024 s by default) are cut
    where they are decoded (`decode_cut.decode_blocks`): they gain nothing from sharing VAD batches."""
    return options.batch_windows * options.max_window_s


def _segment_block(base: pa.Table, block: list, sample_rate_hz: int) -> pa.Table:
    """The segment rows of `block` ((row of `base`, segment index, segment count, Piece or None)):
    a SEGMENT row for each piece, an END row (count 0) for a recording without any."""
    pieces = [piece for _, _, _, piece in block]
    return segment_rows(
        base.take(pa.array([row for row, _, _, _ in block], pa.int64())),
        samples_to_arrow([None if p is None else p[3] for p in pieces]),
        row_kind=[END if p is None else SEGMENT for p in pieces],
        segment_index=[k for _, k, _, _ in block],
        segment_count=[count for _, _, count, _ in block],
        start_s=[None if p is None else p[0] / sample_rate_hz for p in pieces],
        end_s=[None if p is None else p[1] / sample_rate_hz for p in pieces],
        channel=[None if p is None else p[2] for p in pieces],
        calls=[None if p is None else p[4] for p in pieces],
    )
