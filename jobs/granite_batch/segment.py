"""Find the speech in a recording and cut it into segments the model can take in one pass.

Silero VAD gives a speech probability for every 32 ms frame. Frames above `threshold` start speech
and frames below `neg_threshold` end it (silero's own rule, `speech_regions`); speech regions get
`pad_s` of context on each side, and neighbouring regions are merged into segments of at most
`max_segment_s`. Speech that runs on longer
than that is cut in the longest pause (VAD probability, then energy) of the second half of each
window, so a cut falls between words, not inside one. Silence outside every segment is dropped.

A recording no longer than `max_segment_s` that holds any speech stays whole (one segment); one
with no speech, or too short to hold a word, has no segment.

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

import bisect
import functools
import warnings
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from granite_batch.audio import samples_from_arrow, samples_to_arrow
from granite_batch.isolation import Crash, CrashTest, map_isolated

PAUSE_FRAME_S = 0.01  # frame for finding the pauses where long speech is cut
PAUSE_DB = 35.0  # a frame this far below the window's median energy is a pause
VAD_RATE_HZ = 16000
VAD_FRAME = 512  # samples per silero VAD frame at 16 kHz (32 ms)
# Segment rows leave the segment stage in tables of about this many bytes of samples (17 minutes).
SEGMENT_BLOCK_BYTES = 64 << 20


@dataclass(frozen=True)
class VadOptions:
    """How speech is found and merged into segments (`max_segment_s` comes from the job config)."""

    threshold: float = 0.5  # speech probability at which speech starts
    neg_threshold: float = 0.35  # speech goes on until the probability falls below this
    min_speech_s: float = 0.25  # shorter bursts are noise, not words
    min_silence_s: float = 0.1  # shorter dips do not end a speech region
    pad_s: float = 0.2  # context kept before and after speech (clipped halfway into short pauses)
    max_merge_gap_s: float = 3.0  # longer pauses end a segment even when the next speech would fit
    # The VAD runs over windows side by side as one batch (one frame of each window per call, 16x
    # faster than one frame at a time): up to `batch_windows` windows of 4..16 s each, each after
    # `warmup_s` of the audio before it so that its state has settled.
    min_window_s: float = 4.0
    max_window_s: float = 16.0
    warmup_s: float = 0.5
    batch_windows: int = 64


@functools.cache
def vad_model():
    """Silero VAD (its TorchScript model, shipped in the package), loaded once per process."""
    import torch

    threads = torch.get_num_threads()
    from silero_vad import load_silero_vad  # its import sets torch to 1 thread for the whole process

    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        # torch.jit.load's and importlib.resources.path's deprecation notices: nothing we can act on.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return load_silero_vad()


@functools.cache
def warm_vad() -> None:
    """Load the VAD and run it once in this process, so that children forked from it (isolation.py)
    start with the model loaded and TorchScript's profiling runs done: a cold child spends 2-6 s
    on them (measured on 2 busy cores) against 0.2 s for a batch of 16 short clips."""
    for length in (VAD_RATE_HZ, 8 * VAD_RATE_HZ):
        speech_probabilities(np.zeros(length, np.float32))


def speech_probabilities(samples: np.ndarray, options: VadOptions = VadOptions()) -> np.ndarray:
    """Silero's speech probability for each 512-sample frame of 16 kHz `samples` (last one padded)."""
    return speech_probabilities_many([samples], [(0, 0, len(samples))], options)[0]


def speech_probabilities_many(buffers: list[np.ndarray], spans: list[tuple[int, int, int]],
                              options: VadOptions = VadOptions()) -> list[np.ndarray]:
    """`speech_probabilities` of each recording `buffers[b][offset:offset + length]`, for
    (b, offset, length) in `spans` (recordings packed in a few buffers, as Arrow chunks hold them),
    computed together in this process: windows of all the recordings run side by side,
    `batch_windows` at a time (`vad_window_groups`, `window_samples`, `window_probabilities`).
    """
    recordings = [buffers[b][offset:offset + length] for b, offset, length in spans]
    return _vad(recordings, [None] * len(recordings), options, isolate=False, crash_test=None)


def vad_window_groups(lengths: list[int], options: VadOptions = VadOptions()) -> list[list[tuple[int, int, int]]]:
    """The VAD's work on recordings of `lengths` samples: groups of at most `batch_windows` windows
    (recording, first frame, frames), similar lengths together, each group one batch of the model.

    Each recording is read as windows of `min_window_s`..`max_window_s` chosen from its own length,
    so its probabilities do not depend on what it was batched with, and a short clip runs beside its
    neighbours instead of being stepped alone.
    """
    per_s = VAD_RATE_HZ / VAD_FRAME
    windows = []
    for i, length in enumerate(lengths):
        count = -(-length // VAD_FRAME)
        window = min(round(options.max_window_s * per_s),
                     max(round(options.min_window_s * per_s), -(-count // options.batch_windows)))
        windows.extend((i, first, min(window, count - first)) for first in range(0, count, window))
    # Similar lengths side by side, so few steps run past a window's end.
    windows.sort(key=lambda job: job[2], reverse=True)
    return [windows[start:start + options.batch_windows] for start in range(0, len(windows), options.batch_windows)]


def window_samples(recordings: list[np.ndarray], group: list[tuple[int, int, int]],
                   options: VadOptions = VadOptions()) -> np.ndarray:
    """The samples one group of windows reads, as (windows x (warm-up + longest window) * 512)
    float32: each row `warmup_s` of the audio before its window, then the window, silence outside
    its recording. At most `batch_windows` x 16.5 s of audio (68 MB), however long the recordings."""
    warmup = _warmup_frames(options)
    steps = warmup + max(frames for _, _, frames in group)
    out = np.zeros((len(group), steps * VAD_FRAME), np.float32)
    for row, (recording, first, frames) in enumerate(group):
        samples = recordings[recording]
        start = (first - warmup) * VAD_FRAME
        low, high = max(0, start), min(len(samples), (first + frames) * VAD_FRAME)
        out[row, low - start:high - start] = samples[low:high]
    return out


def window_probabilities(samples: np.ndarray, options: VadOptions = VadOptions()) -> np.ndarray:
    """Silero's speech probability for each frame of each window (after its warm-up), as
    (windows x longest window) float32, from `window_samples`' rows run side by side; one thread,
    as silero advises (a (windows x 512) step is too small to share, and spinning threads cost
    several times the work on a machine whose cores are busy with other stages)."""
    import torch

    model = vad_model()
    warmup = _warmup_frames(options)
    steps = samples.shape[1] // VAD_FRAME
    probs = np.zeros((samples.shape[0], steps - warmup), np.float32)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            model.reset_states()
            for step in range(steps):
                # A fresh array each step: the model may keep a view of its input as context.
                chunk = np.ascontiguousarray(samples[:, step * VAD_FRAME:(step + 1) * VAD_FRAME])
                out = model(torch.from_numpy(chunk), VAD_RATE_HZ)[:, 0].numpy()
                if step >= warmup:
                    probs[:, step - warmup] = out
    finally:
        torch.set_num_threads(threads)
    return probs


def scatter_probabilities(probs: list[np.ndarray], group: list[tuple[int, int, int]], computed: np.ndarray) -> None:
    """Put each window's probabilities (`window_probabilities`) in its recording's place in `probs`."""
    for row, (recording, first, frames) in enumerate(group):
        probs[recording][first:first + frames] = computed[row, :frames]


def _warmup_frames(options: VadOptions) -> int:
    return round(options.warmup_s * VAD_RATE_HZ / VAD_FRAME)


def speech_regions(probs: np.ndarray, n: int, options: VadOptions = VadOptions()) -> list[tuple[int, int]]:
    """(start, end) sample offsets of speech in a recording of `n` samples, from VAD frame probabilities.

    silero's own rule, `get_speech_timestamps_from_probs` (what `get_speech_timestamps` runs on its
    probabilities), without its padding (`_padded` pads): speech starts at a frame >= `threshold`
    and ends at a frame < `neg_threshold` once a later frame, `min_silence_s` on, is still below
    it with no frame >= `threshold` between; shorter bursts than `min_speech_s` are dropped.
    """
    from silero_vad import get_speech_timestamps_from_probs

    regions = get_speech_timestamps_from_probs(
        probs.tolist(), sampling_rate=VAD_RATE_HZ, threshold=options.threshold,
        neg_threshold=options.neg_threshold, min_speech_duration_ms=options.min_speech_s * 1000,
        min_silence_duration_ms=options.min_silence_s * 1000, speech_pad_ms=0, audio_length_samples=n,
    )
    return [(region["start"], region["end"]) for region in regions]


def plan_segments(samples: np.ndarray, sample_rate_hz: int, max_segment_s: float,
                  options: VadOptions = VadOptions(), probabilities: np.ndarray | None = None) -> list[tuple[int, int]]:
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
    regions = speech_regions(probabilities, n, options)
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


def _cut_long(samples: np.ndarray, start: int, end: int, max_len: int, sample_rate_hz: int,
              probabilities: np.ndarray, options: VadOptions) -> list[tuple[int, int]]:
    """Cut [start, end) into pieces of at most `max_len`, each cut in the longest pause of the
    second half of its window (`_cut_point`), so pieces stay long and words stay whole."""
    pieces = []
    while end - start > max_len:
        cut = _cut_point(samples, start + max_len // 2, start + max_len, sample_rate_hz, probabilities, options)
        pieces.append((start, cut))
        start = cut
    pieces.append((start, end))
    return pieces


def _cut_point(samples: np.ndarray, low: int, high: int, sample_rate_hz: int, probabilities: np.ndarray,
               options: VadOptions) -> int:
    """Where to cut speech inside [low, high): in its longest pause.

    A 10 ms frame is a pause when the VAD calls it non-speech (probability below `neg_threshold`) or
    its energy is `PAUSE_DB` below the window's median frame (a gap between words: silero's
    probability barely dips in gaps under 100 ms, so energy finds most of them). The longest run of
    pause frames wins (then the one the VAD is surest of, then the latest), as silero's own splitter
    prefers pauses of 98 ms or more over cutting at its limit; the cut is at the run's quietest frame.
    With no pause at all (noise, music under speech) the cut is at the frame of least speech
    probability, then least energy.
    """
    frame = max(1, int(PAUSE_FRAME_S * sample_rate_hz))
    count = (high - low) // frame
    if count < 1:
        return high
    energy = np.square(samples[low: low + count * frame], dtype=np.float64).reshape(count, frame).mean(axis=1)
    centres = low + np.arange(count) * frame + frame // 2
    speech = probabilities[np.minimum(centres // VAD_FRAME, len(probabilities) - 1)]
    quiet_level = np.median(energy) * 10 ** (-PAUSE_DB / 10)
    pause = (speech < options.neg_threshold) | (energy <= quiet_level)
    edges = np.flatnonzero(np.diff(np.concatenate(([0], pause.astype(np.int8), [0]))))
    runs = edges.reshape(-1, 2)
    if len(runs):
        first, last = max(runs.tolist(), key=lambda run: (run[1] - run[0], -speech[run[0]:run[1]].mean(), run[0]))
    else:
        first, last = 0, count
    # Least speech probability, then least energy, then nearest the pause's middle.
    order = np.lexsort((np.abs(np.arange(first, last) - (first + last - 1) / 2), energy[first:last],
                        speech[first:last]))
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


def _group_probabilities(work: tuple[np.ndarray, list[str | None]], options: VadOptions,
                         crash_test: CrashTest | None) -> np.ndarray:
    """`window_probabilities` of one group's samples, as the helper process runs it (isolation.py);
    the audio its windows come from is named for `crash_test`."""
    samples, audio = work
    if crash_test is not None:
        crash_test.check("segment", audio)
    return window_probabilities(samples, options)


def _vad(units: list[np.ndarray], audio: list[str | None], options: VadOptions, isolate: bool,
         crash_test: CrashTest | None) -> list[np.ndarray | Crash]:
    """Speech probabilities of each of `units` (the samples of a recording or of one of its
    channels; `audio` names each unit's recording), or a `Crash` for a unit whose VAD kills the
    helper process.

    The helper is sent one group of windows at a time (`window_samples`: at most 68 MB), never a
    recording, so it holds a bounded amount however long the recordings are. A group that kills
    the helper, twice, is redone recording by recording, so only the recordings that crash it alone
    fail.
    """
    probs: list[np.ndarray | Crash] = [np.zeros(-(-len(samples) // VAD_FRAME), np.float32) for samples in units]
    run = functools.partial(_group_probabilities, options=options, crash_test=crash_test)
    for group in vad_window_groups([len(samples) for samples in units], options):
        tries = [group]
        while tries:
            windows = [window for window in tries.pop() if not isinstance(probs[window[0]], Crash)]
            if not windows:
                continue
            names = sorted({audio[unit] for unit, _, _ in windows}, key=str)
            [computed] = map_isolated(run, [(window_samples(units, windows, options), names)], isolate=isolate)
            if not isinstance(computed, Crash):
                scatter_probabilities(probs, windows, computed)
            elif len({unit for unit, _, _ in windows}) == 1:
                probs[windows[0][0]] = computed
            else:
                by_unit: dict[int, list[tuple[int, int, int]]] = {}
                for window in windows:
                    by_unit.setdefault(window[0], []).append(window)
                tries.extend(reversed(list(by_unit.values())))
    return probs


def segment_table(table: pa.Table, sample_rate_hz: int, max_segment_s: float,
                  options: VadOptions = VadOptions(), isolate: bool = True,
                  crash_test: CrashTest | None = None) -> pa.Table:
    """`segment_blocks` as one table."""
    blocks = list(segment_blocks(table, sample_rate_hz, max_segment_s, options, isolate, crash_test))
    return pa.concat_tables(blocks) if len(blocks) > 1 else blocks[0]


def segment_blocks(table: pa.Table, sample_rate_hz: int, max_segment_s: float,
                   options: VadOptions = VadOptions(), isolate: bool = True,
                   crash_test: CrashTest | None = None, block_bytes: int = SEGMENT_BLOCK_BYTES):
    """Segment stage: decoded recordings in, one row per speech segment out, in tables of about
    `block_bytes` of samples each (Ray Data gathers them into blocks up to its own target size,
    128 MB, and stores each block as it fills), so the worker never builds a long recording's
    segment rows all at once.

    Each segment row carries its recording's columns (all but `samples`), `segment_index` (0-based),
    `segment_count` (the recording's), `start_s` / `end_s`, `channel` and the segment's own
    `samples`, at most `max_segment_s` long: what leaves this stage is bounded however long the
    recording. A recording decoded with its channels split (`channel_count` set, audio.decode_table)
    is segmented channel by channel; its segments carry their `channel` and are numbered in time
    order over all channels (then by channel), so a silent channel costs its VAD and nothing more;
    `channel` is null for mono recordings. A recording with no segment (an error, silence, too short
    to hold speech) gives one row with `segment_count` 0 and no samples, so every recording still
    reaches the driver. The VAD runs over all the recordings (and channels) of the table at once, so
    short clips run side by side. With `isolate` it runs in a helper process (isolation.py), one
    group of windows at a time: a recording that crashes it becomes an error row ("segment crashed
    the worker: signal 11 (SIGSEGV)"). Segments are then planned here from the probabilities (numpy
    only). Rows `decode_cut.decode_blocks` already cut (`segment_count` set) pass through as they are.
    `crash_test` is for tests only.
    """
    if "segment_count" in table.column_names:  # from decode_blocks: long recordings come already cut
        to_cut = table.column("segment_count").null_count
        if to_cut == 0 and table.num_rows:
            yield _output_columns(table)
            return
        cut = table.column("segment_count").is_valid()
        if to_cut < table.num_rows:
            yield _output_columns(table.filter(cut))
        table = table.filter(pc.invert(cut)).drop_columns(list(CUT_COLUMNS))
    recordings = samples_from_arrow(table.column("samples"))
    n = table.num_rows
    audio = table.column("audio").to_pylist() if "audio" in table.column_names else [None] * n
    errors = table.column("error").to_pylist() if "error" in table.column_names else [None] * n
    channel_counts = (table.column("channel_count").to_pylist() if "channel_count" in table.column_names
                      else [None] * n)
    bounds_of = plan_recordings(recordings, channel_counts, audio, errors, sample_rate_hz, max_segment_s, options,
                                isolate, crash_test)
    base = table.drop_columns([c for c in ("samples", "error", "channel_count") if c in table.column_names])
    base = base.append_column("error", pa.array(errors, pa.string()))
    block: list[tuple[int, int | None, int, tuple[int, int, int | None, np.ndarray] | None]] = []
    size = 0
    for row in range(n):
        bounds = bounds_of.get(row, [])
        if not bounds:  # one row all the same, so the recording reaches the driver
            block.append((row, None, 0, None))
        for k, bound in enumerate(bounds):
            block.append((row, k, len(bounds), bound))
            size += 4 * (bound[1] - bound[0])
            if size >= block_bytes:
                yield _segment_block(base, block, sample_rate_hz)
                block, size = [], 0
    if block or n == 0:
        yield _segment_block(base, block, sample_rate_hz)


def plan_recordings(recordings: list[np.ndarray | None], channel_counts: list[int | None], audio: list[str | None],
                    errors: list[str | None], sample_rate_hz: int, max_segment_s: float, options: VadOptions,
                    isolate: bool, crash_test: CrashTest | None) -> dict[int, list[tuple[int, int, int | None, np.ndarray]]]:
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
        units.extend((row, c, samples[c * length:(c + 1) * length]) for c in range(channel_counts[row]))
    # Too short to hold a word: no VAD, no segment.
    units = [unit for unit in units if len(unit[2]) >= options.min_speech_s * sample_rate_hz]
    if isolate and units:
        warm_vad()  # before the helper is forked, so that it starts warm
    probabilities = _vad([samples for _, _, samples in units], [audio[row] for row, _, _ in units],
                         options, isolate, crash_test)
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


# The columns a segment row adds to its recording's (its samples are the segment's).
CUT_COLUMNS = ("segment_index", "segment_count", "start_s", "end_s", "channel")


def _output_columns(table: pa.Table) -> pa.Table:
    """Segment rows from decode_cut.decode_blocks in segment_blocks' column order: the recording's, `error`,
    CUT_COLUMNS, `samples`."""
    last = ["error", *CUT_COLUMNS, "samples"]
    return table.select([c for c in table.column_names if c not in last and c != "channel_count"] + last)


def long_recording_s(options: VadOptions = VadOptions()) -> float:
    """Recordings at least this long (one full group of VAD windows: 1,024 s by default) are cut
    where they are decoded (`decode_cut.decode_blocks`): they gain nothing from sharing VAD batches."""
    return options.batch_windows * options.max_window_s


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
            parts.append(self.pieces[k][max(low - offset, 0):high - offset])
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

    def __init__(self, sample_rate_hz: int, max_segment_s: float, options: VadOptions,
                 crash_test: CrashTest | None, audio: str | None):
        if sample_rate_hz != VAD_RATE_HZ:
            raise ValueError(f"segmentation needs {VAD_RATE_HZ} Hz samples, not {sample_rate_hz}")
        self.options, self.crash_test, self.audio = options, crash_test, audio
        self.max_len = int(max_segment_s * sample_rate_hz)
        self.max_gap = int(options.max_merge_gap_s * sample_rate_hz)
        self.pad = int(options.pad_s * sample_rate_hz)
        self.margin = (self.max_len + self.max_gap + 2 * self.pad
                       + int((options.min_speech_s + options.min_silence_s + 1.0) * sample_rate_hz))
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
            self._group([(0, f, self.window) for f in range(first, first + self.options.batch_windows * self.window,
                                                              self.window)])
        count = -(-self.tail.end // VAD_FRAME)
        if final and len(self.probs) < count:
            self._group([(0, f, min(self.window, count - f)) for f in range(len(self.probs), count, self.window)])
        known = self.tail.end if final else len(self.probs) * VAD_FRAME
        fresh = [(start + self.restart * VAD_FRAME, end + self.restart * VAD_FRAME) for start, end in
                 speech_regions(self.probs[self.restart:], known - self.restart * VAD_FRAME, self.options)]
        regions = self.regions + fresh
        closed = [r for r in fresh if final or r[1] < known]  # a region still open ends at `known`
        if closed and not final:  # silero's state is idle where a region starts: run again from the last closed one
            last = closed[-1]
            self.regions += fresh[:fresh.index(last)]
            self.restart = last[0] // VAD_FRAME
        pieces: list[tuple[int, int]] = []
        for start, end in _padded(regions, known, self.pad) if regions else []:
            if end > self.emitted_end:
                pieces.extend(_cut_long(self.tail, max(start, self.emitted_end), end, self.max_len, VAD_RATE_HZ,
                                        self.probs, self.options))
        merged = _merge(pieces, self.max_len, self.max_gap) if pieces else []
        horizon = known if final else known - self.margin
        done = [segment for segment in merged if segment[1] <= horizon]
        if done:
            self.emitted_end = done[-1][1]
        waiting = [segment[0] for segment in merged[len(done):]]
        self.keep_from = max(self.emitted_end, min(waiting + [known - self.margin]))
        return done

    def samples(self, start: int, end: int) -> np.ndarray:
        return np.array(self.tail[start:end], np.float32)

    def forget(self) -> None:
        """Let go of the audio that no segment still to come can hold."""
        self.tail.forget_before(self.keep_from)

    def _group(self, windows: list[tuple[int, int, int]]) -> None:
        computed = _group_probabilities((window_samples([self.tail], windows, self.options), [self.audio]),
                                        self.options, self.crash_test)
        end = windows[-1][1] + windows[-1][2]
        self.probs = np.concatenate([self.probs, np.zeros(end - len(self.probs), np.float32)])
        scatter_probabilities([self.probs], windows, computed)


def _segment_block(base: pa.Table, block: list, sample_rate_hz: int) -> pa.Table:
    """The segment rows of `block` ((row of `base`, segment index, segment count, bound or None))."""
    bounds = [bound for _, _, _, bound in block]
    out = base.take(pa.array([row for row, _, _, _ in block], pa.int64()))
    out = out.append_column("segment_index", pa.array([k for _, k, _, _ in block], pa.int32()))
    out = out.append_column("segment_count", pa.array([count for _, _, count, _ in block], pa.int32()))
    out = out.append_column("start_s", pa.array([None if b is None else b[0] / sample_rate_hz for b in bounds],
                                                pa.float64()))
    out = out.append_column("end_s", pa.array([None if b is None else b[1] / sample_rate_hz for b in bounds],
                                              pa.float64()))
    out = out.append_column("channel", pa.array([None if b is None else b[2] for b in bounds], pa.int32()))
    return out.append_column("samples", samples_to_arrow([None if b is None else b[3][b[0]:b[1]] for b in bounds]))
