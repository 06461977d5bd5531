"""Decode any recording FFmpeg can read into 16 kHz mono float32 samples.

PyAV demuxes and decodes (audio files and video files with an audio track); channels are averaged
to mono with numpy; soxr resamples with its high-quality filter, streaming, so memory stays at the
size of the output. Everything a single recording can do wrong comes back as a short reason.
"""

from __future__ import annotations

import functools
import os
import stat
import time
from dataclasses import dataclass

import av
import numpy as np
import pyarrow as pa
import soxr

from granite_batch.isolation import Crash, CrashTest, map_isolated
from granite_batch.storage import LOCAL_PROTOCOLS, filesystem, protocol_of

SAMPLE_RATE_HZ = 16000
# Decoded audio accumulates in 32 MB blocks: large enough that freed blocks go back to the OS (glibc
# serves them with mmap), few enough that a 3-hour recording is ~22 of them, not ~100,000 frames.
_BLOCK_SAMPLES = 1 << 23


class DecodeError(Exception):
    """One recording could not be turned into samples; str() is the reason for the output row."""


@dataclass
class Recording:
    """A decoded recording: mono float32 samples at `sample_rate_hz`."""

    samples: np.ndarray
    sample_rate_hz: int
    source_rate_hz: int
    source_channels: int

    @property
    def duration_s(self) -> float:
        return len(self.samples) / self.sample_rate_hz


def decode_audio(
    source, sample_rate_hz: int = SAMPLE_RATE_HZ, max_duration_s: float | None = None, name: str = "file",
    timeout_s: float | None = None,
) -> Recording:
    """Decode `source` (a path or a binary file object) to mono float32 at `sample_rate_hz`.

    Raises DecodeError with a short reason when the recording cannot be used. A recording longer
    than `max_duration_s` is refused as soon as the decoder gets past that point, and one whose
    decoding takes longer than `timeout_s` seconds is abandoned between two frames.
    """
    try:
        container = av.open(source, mode="r", metadata_errors="ignore")
    except av.error.InvalidDataError:
        raise DecodeError(f"decode failed: {name} is not a recognised audio or video file") from None
    except av.error.FFmpegError as exc:
        raise DecodeError(f"decode failed: cannot open {name} ({_ffmpeg_reason(exc)})") from None
    with container:
        if not container.streams.audio:
            kind = container.format.name.split(",")[0]
            raise DecodeError(f"decode failed: no audio stream in container {kind}")
        stream = container.streams.audio[0]
        stream.thread_type = "AUTO"
        try:
            return _decode_stream(container, stream, sample_rate_hz, max_duration_s, timeout_s)
        except av.error.FFmpegError as exc:
            raise DecodeError(f"decode failed: {_ffmpeg_reason(exc)} ({stream.codec_context.name})") from None


def _decode_stream(container, stream, sample_rate_hz: int, max_duration_s: float | None,
                   timeout_s: float | None) -> Recording:
    source_rate = stream.codec_context.sample_rate or stream.rate
    if not source_rate:
        raise DecodeError("decode failed: the audio stream has no sample rate")
    channels = stream.codec_context.channels or 1
    # Interleaved float at the stream's own rate and layout: channel downmix and resampling are ours.
    # Not planar: PyAV 18.1's AudioFrame.planes counts planes by walking extended_data to a NULL
    # that a frame of 8 or more planes does not have (AV_NUM_DATA_POINTERS is 8), so to_ndarray()
    # read wild pointers and crashed the worker on any 8+ channel recording. An interleaved frame has
    # one plane whatever its channels (torchcodec hit the same limit: meta-pytorch/torchcodec#1166).
    converter = av.AudioResampler(format="flt", rate=source_rate)
    resampler = None if source_rate == sample_rate_hz else soxr.ResampleStream(
        source_rate, sample_rate_hz, 1, dtype="float32", quality="HQ"
    )
    limit = None if max_duration_s is None else int(max_duration_s * sample_rate_hz)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    blocks: list[np.ndarray] = []
    filled = _BLOCK_SAMPLES  # samples used in the last block
    total = 0

    def push(interleaved: np.ndarray, last: bool = False) -> None:
        nonlocal total, filled
        mono = _downmix(interleaved)
        out = mono if resampler is None else resampler.resample_chunk(mono, last=last)
        while out.size:
            if filled == _BLOCK_SAMPLES:
                blocks.append(np.empty(_BLOCK_SAMPLES, np.float32))
                filled = 0
            take = min(_BLOCK_SAMPLES - filled, out.size)
            blocks[-1][filled:filled + take] = out[:take]
            filled += take
            total += take
            out = out[take:]
        if limit is not None and total > limit:
            raise DecodeError(
                f"too long: more than {max_duration_s:.0f} s of audio (raise max_duration_s to allow it)"
            )
        if deadline is not None and time.monotonic() > deadline:
            raise DecodeError(f"decode timed out: more than {timeout_s:.0f} s (raise decode_timeout_s to allow it)")

    # Frames are gathered into about a second of audio before the downmix and resampling: per 20 ms
    # Opus frame those cost more than the decoding (block by block: 1.3-1.5x faster for every codec).
    pending: list[np.ndarray] = []
    pending_samples = 0
    for frame in container.decode(stream):
        for converted in converter.resample(frame):
            pending.append(_interleaved(converted))
            pending_samples += converted.samples
        if pending_samples >= source_rate:
            # One layout throughout: the converter refuses a frame that changes it.
            push(np.concatenate(pending) if len(pending) > 1 else pending[0])
            pending, pending_samples = [], 0
    for converted in converter.resample(None):
        pending.append(_interleaved(converted))
    if pending:
        push(np.concatenate(pending) if len(pending) > 1 else pending[0])
    if resampler is not None:
        push(np.zeros((0, 1), dtype=np.float32), last=True)

    if total == 0:
        raise DecodeError("decode failed: no audio samples decoded (empty or truncated recording)")
    samples = np.empty(total, np.float32)
    for i in range(len(blocks)):
        start = i * _BLOCK_SAMPLES
        end = min(start + _BLOCK_SAMPLES, total)
        samples[start:end] = blocks[i][: end - start]
        blocks[i] = None  # give each block back as soon as it is copied: peak stays near 1x + one block
    # One float64 sum is finite exactly when every sample is, without a bool array the size of the audio.
    if not np.isfinite(np.sum(samples, dtype=np.float64)):
        np.nan_to_num(samples, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    return Recording(samples, sample_rate_hz, int(source_rate), int(channels))


def _interleaved(frame) -> np.ndarray:
    """An interleaved float frame as a (samples, channels) view of its one plane."""
    channels = len(frame.layout.channels)
    return np.frombuffer(frame.planes[0], dtype=np.float32, count=frame.samples * channels).reshape(-1, channels)


def _downmix(interleaved: np.ndarray) -> np.ndarray:
    """The mean of the channels of (samples, channels), one column at a time: as fast as averaging
    planar channels (numpy's reduction along the short last axis is about 2x slower)."""
    channels = interleaved.shape[1]
    if channels == 1:
        return interleaved[:, 0]
    mono = interleaved[:, 0].copy()
    for channel in range(1, channels):
        mono += interleaved[:, channel]
    mono *= np.float32(1.0 / channels)
    return mono


def _ffmpeg_reason(exc: Exception) -> str:
    reason = getattr(exc, "strerror", None) or str(exc)
    return reason.strip().rstrip(".").lower() or type(exc).__name__


def load_recording(
    uri: str, storage_options: dict | None = None, sample_rate_hz: int = SAMPLE_RATE_HZ,
    max_duration_s: float | None = None, timeout_s: float | None = None,
) -> Recording:
    """Open `uri` through fsspec (local path, file://, s3://, gs://, ...) and decode it."""
    name = uri.rsplit("/", 1)[-1] or uri
    try:
        fs, path = filesystem(uri, storage_options)
        if protocol_of(uri) in LOCAL_PROTOCOLS:
            # Before anything opens it: opening a FIFO for reading waits for a writer, forever.
            kind = _special_file_kind(os.stat(path).st_mode)
            if kind is not None:
                raise DecodeError(f"not a regular file: {uri} is a {kind}")
        size = fs.size(path)
        if size == 0:
            raise DecodeError("decode failed: empty file (0 bytes)")
        with fs.open(path, "rb") as handle:
            return decode_audio(handle, sample_rate_hz, max_duration_s, name=name, timeout_s=timeout_s)
    except DecodeError:
        raise
    except FileNotFoundError:
        raise DecodeError(f"not found: {uri}") from None
    except PermissionError:
        raise DecodeError(f"access denied: {uri}") from None
    except IsADirectoryError:
        raise DecodeError(f"not a file: {uri} is a directory") from None
    except ImportError as exc:
        raise DecodeError(f"read failed: no filesystem for {uri.split('://')[0]}:// ({exc.name} missing)") from None
    except (OSError, ValueError) as exc:
        raise DecodeError(f"read failed: {type(exc).__name__}: {exc}"[:300]) from None


def _special_file_kind(mode: int) -> str | None:
    """What a local path that is neither a regular file nor a directory is, or None."""
    for test, kind in ((stat.S_ISFIFO, "fifo"), (stat.S_ISCHR, "character device"),
                       (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return kind
    return None


def samples_to_arrow(recordings: list[np.ndarray | None]) -> pa.LargeListArray:
    """Pack ragged float32 sample arrays into one Arrow column without copying each row twice."""
    lengths = np.array([0 if r is None else len(r) for r in recordings], dtype=np.int64)
    offsets = np.zeros(len(recordings) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    present = [r for r in recordings if r is not None]
    if len(present) == 1:
        values = present[0]  # one recording: Arrow wraps its buffer without a copy
    else:
        values = np.concatenate(present).astype(np.float32, copy=False) if present else np.zeros(0, np.float32)
    mask = pa.array([r is None for r in recordings], type=pa.bool_())
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values), mask=mask)


def samples_from_arrow(column: pa.ChunkedArray | pa.Array) -> list[np.ndarray | None]:
    """Zero-copy numpy views of each row's samples (None where the row has none), chunk by chunk."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    rows: list[np.ndarray | None] = []
    for array in chunks:
        offsets = array.offsets.to_numpy()
        values = array.values.to_numpy(zero_copy_only=True)
        valid = array.is_valid().to_numpy(zero_copy_only=False)
        rows.extend(values[offsets[i]:offsets[i + 1]] if valid[i] else None for i in range(len(array)))
    return rows


def _decode_row(uri: str, storage_options: dict | None, sample_rate_hz: int, max_duration_s: float | None,
                timeout_s: float | None, crash_test: CrashTest | None) -> tuple[np.ndarray | None, float | None, str | None]:
    """(samples, duration_s, None) for one recording, or (None, None, the reason it failed)."""
    if crash_test is not None:
        crash_test.check("decode", [uri])
    try:
        recording = load_recording(uri, storage_options, sample_rate_hz, max_duration_s, timeout_s)
    except DecodeError as exc:
        return None, None, str(exc)
    return recording.samples, recording.duration_s, None


def decode_table(table: pa.Table, storage_options: dict | None = None, sample_rate_hz: int = SAMPLE_RATE_HZ,
                 max_duration_s: float | None = None, timeout_s: float | None = None, isolate: bool = True,
                 crash_test: CrashTest | None = None) -> pa.Table:
    """Decode stage: add `samples` and `duration_s`; a row that cannot be decoded gets `error`.

    With `isolate`, the decoding runs in a forked child process (isolation.py): a recording that
    crashes it becomes an error row ("decode crashed the worker: signal 11 (SIGSEGV)") and the
    others are decoded as usual. `crash_test` is for tests only.
    """
    errors = table.column("error").to_pylist()
    uris = table.column("audio").to_pylist()
    todo = [i for i in range(table.num_rows) if errors[i] is None]
    decode = functools.partial(_decode_row, storage_options=storage_options, sample_rate_hz=sample_rate_hz,
                               max_duration_s=max_duration_s, timeout_s=timeout_s, crash_test=crash_test)
    recordings: list[np.ndarray | None] = [None] * table.num_rows
    durations: list[float | None] = [None] * table.num_rows
    for i, result in zip(todo, map_isolated(decode, [uris[i] for i in todo], isolate=isolate)):
        if isinstance(result, Crash):
            errors[i] = result.reason("decode")
        else:
            recordings[i], durations[i], errors[i] = result
    table = table.set_column(table.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
    table = table.append_column("duration_s", pa.array(durations, pa.float64()))
    return table.append_column("samples", samples_to_arrow(recordings))
