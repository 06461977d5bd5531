"""Speech detection with silero-vad: the model, windows of a recording batched through it,
and speech regions from its probabilities.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import numpy as np

from granite_batch.audio.isolation import Crash, CrashTest, map_isolated

PAUSE_FRAME_S = 0.01  # frame for finding the pauses where long speech is cut


PAUSE_DB = 35.0  # a frame this far below the window's median energy is a pause


VAD_RATE_HZ = 16000


VAD_FRAME = 512  # samples per silero VAD frame at 16 kHz (32 ms)


@dataclass(frozen=True)
class VadOptions:
    """How speech is found and merged into segments (`max_segment_s` comes from the job config)."""

    # False: no speech detection; the recording is all speech to the planner, so it is kept whole up
    # to `max_segment_s` and cut in its longest quiet pause (energy alone) beyond that. For a CTC model,
    # which takes silence in its stride (blank frames) and needs no whole utterances: the VAD is most
    # of the CPU the job spends after decoding (benchmarks/bench_cpu_cost.py).
    vad: bool = True
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


def speech_probabilities_many(
    buffers: list[np.ndarray], spans: list[tuple[int, int, int]], options: VadOptions = VadOptions()
) -> list[np.ndarray]:
    """`speech_probabilities` of each recording `buffers[b][offset:offset + length]`, for
    (b, offset, length) in `spans` (recordings packed in a few buffers, as Arrow chunks hold them),
    computed together in this process: windows of all the recordings run side by side,
    `batch_windows` at a time (`vad_window_groups`, `window_samples`, `window_probabilities`).
    """
    recordings = [buffers[b][offset : offset + length] for b, offset, length in spans]
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
        window = min(
            round(options.max_window_s * per_s),
            max(round(options.min_window_s * per_s), -(-count // options.batch_windows)),
        )
        windows.extend((i, first, min(window, count - first)) for first in range(0, count, window))
    # Similar lengths side by side, so few steps run past a window's end.
    windows.sort(key=lambda job: job[2], reverse=True)
    return [windows[start : start + options.batch_windows] for start in range(0, len(windows), options.batch_windows)]


def window_samples(
    recordings: list[np.ndarray], group: list[tuple[int, int, int]], options: VadOptions = VadOptions()
) -> np.ndarray:
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
        out[row, low - start : high - start] = samples[low:high]
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
                chunk = np.ascontiguousarray(samples[:, step * VAD_FRAME : (step + 1) * VAD_FRAME])
                out = model(torch.from_numpy(chunk), VAD_RATE_HZ)[:, 0].numpy()
                if step >= warmup:
                    probs[:, step - warmup] = out
    finally:
        torch.set_num_threads(threads)
    return probs


def scatter_probabilities(probs: list[np.ndarray], group: list[tuple[int, int, int]], computed: np.ndarray) -> None:
    """Put each window's probabilities (`window_probabilities`) in its recording's place in `probs`."""
    for row, (recording, first, frames) in enumerate(group):
        probs[recording][first : first + frames] = computed[row, :frames]


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
        probs.tolist(),
        sampling_rate=VAD_RATE_HZ,
        threshold=options.threshold,
        neg_threshold=options.neg_threshold,
        min_speech_duration_ms=options.min_speech_s * 1000,
        min_silence_duration_ms=options.min_silence_s * 1000,
        speech_pad_ms=0,
        audio_length_samples=n,
    )
    return [(region["start"], region["end"]) for region in regions]


def _group_probabilities(
    work: tuple[np.ndarray, list[str | None]], options: VadOptions, crash_test: CrashTest | None
) -> np.ndarray:
    """`window_probabilities` of one group's samples, as the helper process runs it (isolation.py);
    the audio its windows come from is named for `crash_test`."""
    samples, audio = work
    if crash_test is not None:
        crash_test.check("segment", audio)
    return window_probabilities(samples, options)


def _vad(
    units: list[np.ndarray], audio: list[str | None], options: VadOptions, isolate: bool, crash_test: CrashTest | None
) -> list[np.ndarray | Crash]:
    """Speech probabilities of each of `units` (the samples of a recording or of one of its
    channels; `audio` names each unit's recording), or a `Crash` for a unit whose VAD kills the
    helper process.

    The helper is sent one group of windows at a time (`window_samples`: at most 68 MB), never a
    recording, so it holds a bounded amount however long the recordings are. A group that kills
    the helper, twice, is redone recording by recording, so only the recordings that crash it alone
    fail.
    """
    if not options.vad:  # speech everywhere: nothing to run
        return [np.ones(-(-len(samples) // VAD_FRAME), np.float32) for samples in units]
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
