"""Decode any recording FFmpeg can read into 16 kHz mono float32 samples.

PyAV demuxes and decodes (audio files and video files with an audio track); channels are averaged
to mono with numpy; soxr resamples with its high-quality filter, streaming, so memory stays at the
size of the output. Everything a single recording can do wrong comes back as a short reason.
"""

from __future__ import annotations

import functools
import io
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass

import av
import numpy as np
import pyarrow as pa
import soxr

from granite_batch.audio.isolation import Crash, CrashTest, map_isolated
from granite_batch.storage import HTTP_PROTOCOLS, LOCAL_PROTOCOLS, NotAllowed, filesystem, probe_url, protocol_of

SAMPLE_RATE_HZ = 16000
# Decoded audio accumulates in 32 MB blocks: large enough that freed blocks go back to the OS (glibc
# serves them with mmap), few enough that a 3-hour recording is ~22 of them, not ~100,000 frames.
_BLOCK_SAMPLES = 1 << 23


class DecodeError(Exception):
    """One recording could not be turned into samples; str() is the reason for the output row."""


@dataclass
class Recording:
    """A decoded recording: float32 samples at `sample_rate_hz`, mono (samples,) or, decoded with
    `split_channels`, one row per channel (channels, samples)."""

    samples: np.ndarray | None  # None when decoded into a `sink` (decode_audio)
    sample_rate_hz: int
    source_rate_hz: int
    source_channels: int
    length: int | None = None  # samples per channel, when `samples` is None

    @property
    def duration_s(self) -> float:
        return (self.samples.shape[-1] if self.samples is not None else self.length) / self.sample_rate_hz


def decode_audio(
    source,
    sample_rate_hz: int = SAMPLE_RATE_HZ,
    max_duration_s: float | None = None,
    name: str = "file",
    timeout_s: float | None = None,
    split_channels: bool = False,
    sink: Callable[[np.ndarray], None] | None = None,
) -> Recording:
    """Decode `source` (a path or a binary file object) to mono float32 at `sample_rate_hz`, or
    with `split_channels` to one row of samples per channel. With `sink` (mono only), each piece of
    samples (about a second, in order) is given to it as it is decoded, none is kept, and the
    Recording has no samples, only their `length`.

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
        # FFmpeg's default, one decoding thread: frame threads ("AUTO") cost FLAC about a fifth more CPU
        # time (40 clips: 0.98 against 0.89 CPU s, whole process) and gain the others nothing, and every
        # core of a worker node already runs a decode task of its own.
        try:
            if split_channels:
                if sink is not None:
                    raise ValueError("a sink takes mono samples, not split channels")
                return _decode_channels(container, stream, sample_rate_hz, max_duration_s, timeout_s)
            return _decode_stream(container, stream, sample_rate_hz, max_duration_s, timeout_s, sink)
        except av.error.FFmpegError as exc:
            raise DecodeError(f"decode failed: {_ffmpeg_reason(exc)} ({stream.codec_context.name})") from None


# Below this a header's rate is not audio (speech codecs start at 8 kHz): a WAV header claiming 2 Hz
# would be resampled into hours of samples and counted as hours of audio.
MIN_SOURCE_RATE_HZ = 1000


def _source_rate(stream) -> int:
    """The stream's sample rate; DecodeError (the row's error) when it has none or an absurd one."""
    source_rate = stream.codec_context.sample_rate or stream.rate
    if not source_rate:
        raise DecodeError("decode failed: the audio stream has no sample rate")
    if source_rate < MIN_SOURCE_RATE_HZ:
        raise DecodeError(
            f"decode failed: the header claims a sample rate of {source_rate} Hz (audio has at least "
            f"{MIN_SOURCE_RATE_HZ} Hz); the file is damaged or not what it says"
        )
    return source_rate


def _decode_stream(
    container,
    stream,
    sample_rate_hz: int,
    max_duration_s: float | None,
    timeout_s: float | None,
    sink: Callable[[np.ndarray], None] | None = None,
) -> Recording:
    source_rate = _source_rate(stream)
    channels = stream.codec_context.channels or 1
    # Interleaved float at the stream's own rate and layout: channel downmix and resampling are ours.
    # Not planar: PyAV 18.1's AudioFrame.planes counts planes by walking extended_data to a NULL
    # that a frame of 8 or more planes does not have (AV_NUM_DATA_POINTERS is 8), so to_ndarray()
    # read wild pointers and crashed the worker on any 8+ channel recording. An interleaved frame has
    # one plane whatever its channels (torchcodec hit the same limit: meta-pytorch/torchcodec#1166).
    converter = av.AudioResampler(format="flt", rate=source_rate)
    resampler = (
        None
        if source_rate == sample_rate_hz
        else soxr.ResampleStream(source_rate, sample_rate_hz, 1, dtype="float32", quality="HQ")
    )
    limit = None if max_duration_s is None else int(max_duration_s * sample_rate_hz)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    blocks: list[np.ndarray] = []
    filled = _BLOCK_SAMPLES  # samples used in the last block
    total = 0

    def push(mono: np.ndarray, last: bool = False) -> None:
        nonlocal total, filled, deadline
        out = mono if resampler is None else resampler.resample_chunk(mono, last=last)
        if sink is not None:
            if out.size:
                total += out.size
                _check_limits(total, limit, max_duration_s, deadline, timeout_s)
                out = np.array(out, np.float32)  # its own memory: a frame's buffer is reused
                if not np.isfinite(np.sum(out, dtype=np.float64)):
                    np.nan_to_num(out, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
                given = time.monotonic()
                sink(out)
                if deadline is not None:  # the time the sink's owner spent on it is not decoding
                    deadline += time.monotonic() - given
            return
        while out.size:
            if filled == _BLOCK_SAMPLES:
                blocks.append(np.empty(_BLOCK_SAMPLES, np.float32))
                filled = 0
            take = min(_BLOCK_SAMPLES - filled, out.size)
            blocks[-1][filled : filled + take] = out[:take]
            filled += take
            total += take
            out = out[take:]
        _check_limits(total, limit, max_duration_s, deadline, timeout_s)

    for mono in _mono_seconds(container, stream, converter, source_rate):
        push(mono)
    if resampler is not None:
        push(np.zeros(0, dtype=np.float32), last=True)

    if total == 0:
        raise DecodeError("decode failed: no audio samples decoded (empty or truncated recording)")
    if sink is not None:
        return Recording(None, sample_rate_hz, int(source_rate), int(channels), length=total)
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


def _decode_channels(
    container, stream, sample_rate_hz: int, max_duration_s: float | None, timeout_s: float | None
) -> Recording:
    """`_decode_stream` without the downmix: soxr resamples the interleaved channels together, and
    the result is one row per channel (channels, samples)."""
    source_rate = _source_rate(stream)
    converter = av.AudioResampler(format="flt", rate=source_rate)
    resampler = None
    limit = None if max_duration_s is None else int(max_duration_s * sample_rate_hz)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    chunks: list[np.ndarray] = []
    total = 0

    def push(interleaved: np.ndarray, last: bool = False) -> None:
        nonlocal total, resampler
        if resampler is None and source_rate != sample_rate_hz:
            resampler = soxr.ResampleStream(
                source_rate, sample_rate_hz, interleaved.shape[1], dtype="float32", quality="HQ"
            )
        out = interleaved.copy() if resampler is None else resampler.resample_chunk(interleaved, last=last)
        if len(out):
            chunks.append(out)
            total += len(out)
        _check_limits(total, limit, max_duration_s, deadline, timeout_s)

    for interleaved in _interleaved_seconds(container, stream, converter, source_rate):
        push(interleaved)
    if resampler is not None:
        push(np.zeros((0, chunks[-1].shape[1] if chunks else 1), dtype=np.float32), last=True)
    if total == 0:
        raise DecodeError("decode failed: no audio samples decoded (empty or truncated recording)")
    samples = np.ascontiguousarray(np.concatenate(chunks).T)
    chunks.clear()
    if not np.isfinite(np.sum(samples, dtype=np.float64)):
        np.nan_to_num(samples, copy=False, nan=0.0, posinf=1.0, neginf=-1.0)
    return Recording(samples, sample_rate_hz, int(source_rate), samples.shape[0])


def _interleaved_seconds(container, stream, converter, source_rate: int):
    """The stream's audio as interleaved (samples, channels) float arrays of about a second each.

    Frames are gathered into about a second of audio before the downmix and resampling: per 20 ms
    Opus frame those cost more than the decoding (block by block: 1.3-1.5x faster for every codec).
    One layout throughout: the converter refuses a frame that changes it.
    """
    pending: list[np.ndarray] = []
    pending_samples = 0
    for frame in container.decode(stream):
        for converted in converter.resample(frame):
            pending.append(_interleaved(converted))
            pending_samples += converted.samples
        if pending_samples >= source_rate:
            yield np.concatenate(pending) if len(pending) > 1 else pending[0]
            pending, pending_samples = [], 0
    for converted in converter.resample(None):
        pending.append(_interleaved(converted))
    if pending:
        yield np.concatenate(pending) if len(pending) > 1 else pending[0]


# Sample formats whose frames are downmixed straight from their planes (dtype, scale to [-1, 1)): the
# decoders of FLAC and WAV (s16), MP3, AAC, Vorbis and Opus (fltp / flt). The same float32 values and
# sums as converting with av.AudioResampler first (tested), at half the CPU for MP3 and AAC: PyAV's
# resampler is a filter graph, and feeding it one small frame at a time costs as much as decoding it.
_DIRECT = {
    "fltp": (np.float32, None),
    "flt": (np.float32, None),
    "s16p": (np.int16, 2.0**-15),
    "s16": (np.int16, 2.0**-15),
}


def _mono_seconds(container, stream, converter, source_rate: int):
    """The stream's audio as mono float32 arrays of about a second each (`_interleaved_seconds`,
    downmixed). Frames of a `_DIRECT` format with fewer than 8 channels (PyAV's planes bug, see
    `_decode_stream`) are read from their planes; any other frame goes through `converter`."""
    pending: list[list[np.ndarray]] = []  # per frame, its channels (views of the frame's planes)
    pending_samples = 0
    kind = None  # the (format, channels) of the pending frames
    for frame in container.decode(stream):
        channels = len(frame.layout.channels)
        if pending and (frame.format.name, channels) != kind:  # a change of format or layout
            yield _downmix_pending(pending, kind)
            pending, pending_samples = [], 0
        if frame.format.name not in _DIRECT or channels >= 8:
            for converted in converter.resample(frame):
                yield _downmix(_interleaved(converted))
            continue
        kind = (frame.format.name, channels)
        dtype = _DIRECT[frame.format.name][0]
        if frame.format.is_planar:
            pending.append([np.frombuffer(plane, dtype, count=frame.samples) for plane in frame.planes[:channels]])
        else:
            packed = np.frombuffer(frame.planes[0], dtype, count=frame.samples * channels).reshape(-1, channels)
            pending.append([packed[:, c] for c in range(channels)])
        pending_samples += frame.samples
        if pending_samples >= source_rate:
            yield _downmix_pending(pending, kind)
            pending, pending_samples = [], 0
    for converted in converter.resample(None):
        yield _downmix(_interleaved(converted))
    if pending:
        yield _downmix_pending(pending, kind)


def _downmix_pending(pending: list[list[np.ndarray]], kind) -> np.ndarray:
    """The mono float32 samples of consecutive frames of one (format, channels) `kind`: each channel
    scaled to float32 as FFmpeg converts it, then summed in channel order and averaged as `_downmix` does."""
    scale = _DIRECT[kind[0]][1]
    columns = [np.concatenate([frame[c] for frame in pending]) for c in range(kind[1])]
    if scale is not None:
        columns = [np.multiply(column, np.float32(scale), dtype=np.float32) for column in columns]
    mono = columns[0]
    for column in columns[1:]:
        mono += column
    if len(columns) > 1:
        mono *= np.float32(1.0 / len(columns))
    return mono


def _check_limits(
    total: int, limit: int | None, max_duration_s: float | None, deadline: float | None, timeout_s: float | None
) -> None:
    if limit is not None and total > limit:
        raise DecodeError(f"too long: more than {max_duration_s:.0f} s of audio (raise max_duration_s to allow it)")
    if deadline is not None and time.monotonic() > deadline:
        raise DecodeError(f"decode timed out: more than {timeout_s:.0f} s (raise decode_timeout_s to allow it)")


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
    uri: str,
    storage_options: dict | None = None,
    sample_rate_hz: int = SAMPLE_RATE_HZ,
    max_duration_s: float | None = None,
    timeout_s: float | None = None,
    *,
    data: bytes | None = None,
    split_channels: bool = False,
    allowed_prefixes: tuple[str, ...] = (),
    sink: Callable[[np.ndarray], None] | None = None,
) -> Recording:
    """Open `uri` through fsspec (local path, file://, s3://, gs://, https://, ...) and decode it;
    with `data`, decode those bytes (embedded audio, `uri` only names them). Over http(s), transient
    failures (dropped connections, timeouts, HTTP 5xx) are retried with backoff (with a `sink`, only
    until it has been given samples), and with `allowed_prefixes` every redirect must stay inside
    them. `sink`: decode_audio's."""
    name = uri.rsplit("/", 1)[-1] or uri
    given = [0]  # pieces given to the sink

    def counted(piece: np.ndarray) -> None:
        given[0] += 1
        sink(piece)

    decode = functools.partial(
        decode_audio,
        sample_rate_hz=sample_rate_hz,
        max_duration_s=max_duration_s,
        name=name,
        timeout_s=timeout_s,
        split_channels=split_channels,
        sink=None if sink is None else counted,
    )
    if data is not None:
        if not data:
            raise DecodeError("decode failed: empty file (0 bytes)")
        return decode(io.BytesIO(data))  # PyAV reads (and seeks) the file object: no temporary file
    web = protocol_of(uri) in HTTP_PROTOCOLS
    for attempt in range(HTTP_ATTEMPTS if web else 1):
        try:
            return _load(uri, storage_options, decode, tuple(allowed_prefixes) if web else None)
        except DecodeError:
            raise
        except NotAllowed as exc:
            raise DecodeError(f"not allowed: {exc}") from None
        except FileNotFoundError:
            raise DecodeError(f"not found: {uri}") from None
        except PermissionError:
            raise DecodeError(f"access denied: {uri}") from None
        except IsADirectoryError:
            raise DecodeError(f"not a file: {uri} is a directory") from None
        except ImportError as exc:
            raise DecodeError(f"read failed: no filesystem for {uri.split('://')[0]}:// ({exc.name} missing)") from None
        except Exception as exc:  # noqa: BLE001 - aiohttp's and fsspec's errors are not all OSErrors
            status = getattr(exc, "status", None)
            if status in (401, 403):
                raise DecodeError(f"access denied: {uri}") from None
            if status in (404, 410):
                raise DecodeError(f"not found: {uri}") from None
            transient = web and (status is None or status >= 500) and not given[0]
            if transient and attempt + 1 < HTTP_ATTEMPTS:
                time.sleep(HTTP_BACKOFF_S * 2**attempt)
                continue
            if not (web or isinstance(exc, (OSError, ValueError))):
                raise
            what = f"HTTP {status}" if status else type(exc).__name__
            suffix = f" (after {HTTP_ATTEMPTS} attempts)" if web else ""
            raise DecodeError(f"read failed: {what}: {exc}"[:280] + suffix) from None
    raise AssertionError("unreachable")  # pragma: no cover


HTTP_ATTEMPTS = 4  # an http(s) recording is tried this often before its row fails
HTTP_BACKOFF_S = 0.25  # doubled after each failed attempt


def _load(uri: str, storage_options: dict | None, decode, allowed_prefixes: tuple[str, ...] | None) -> Recording:
    """Open and decode one recording; `allowed_prefixes` is None except for http(s) URLs."""
    if allowed_prefixes is not None:
        # The redirects are followed here, hop by hop (checked against the allow-list), and the
        # reads then follow none: fsspec's HTTP reads would follow any, and its errors all read
        # "not found"; the HEAD tells a 404 from a 403 from a dropped connection.
        uri, size = probe_url(uri, allowed_prefixes)
        scheme = protocol_of(uri)
        storage_options = {
            **(storage_options or {}),
            scheme: {**(storage_options or {}).get(scheme, {}), "allow_redirects": False},
        }
        fs, path = filesystem(uri, storage_options)
    else:
        fs, path = filesystem(uri, storage_options)
        if protocol_of(uri) in LOCAL_PROTOCOLS:
            # Before anything opens it: opening a FIFO for reading waits for a writer, forever.
            kind = _special_file_kind(os.stat(path).st_mode)
            if kind is not None:
                raise DecodeError(f"not a regular file: {uri} is a {kind}")
        size = fs.size(path)
    if size == 0:
        raise DecodeError("decode failed: empty file (0 bytes)")
    # Over http(s) the probe's length saves fsspec a second HEAD.
    with fs.open(path, "rb", **({"size": size} if allowed_prefixes is not None and size else {})) as handle:
        return decode(handle)


def _special_file_kind(mode: int) -> str | None:
    """What a local path that is neither a regular file nor a directory is, or None."""
    for test, kind in (
        (stat.S_ISFIFO, "fifo"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
    ):
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
        rows.extend(values[offsets[i] : offsets[i + 1]] if valid[i] else None for i in range(len(array)))
    return rows


def _decode_row(
    item: tuple[str, bytes | None, bool],
    storage_options: dict | None,
    sample_rate_hz: int,
    max_duration_s: float | None,
    timeout_s: float | None,
    crash_test: CrashTest | None,
    allowed_prefixes: tuple[str, ...] = (),
    sink: Callable[[np.ndarray], None] | None = None,
) -> tuple[np.ndarray | None, float | None, str | None]:
    """(samples, duration_s, None) for one recording (uri, embedded bytes or None, split channels),
    or (None, None, the reason it failed); with `sink` (mono), its samples went there (decode_audio)."""
    uri, data, split_channels = item
    if crash_test is not None:
        crash_test.check("decode", [uri])
    try:
        recording = load_recording(
            uri,
            storage_options,
            sample_rate_hz,
            max_duration_s,
            timeout_s,
            data=data,
            split_channels=split_channels,
            allowed_prefixes=allowed_prefixes,
            sink=sink,
        )
    except DecodeError as exc:
        return None, None, str(exc)
    return recording.samples, recording.duration_s, None


def decode_table(
    table: pa.Table,
    storage_options: dict | None = None,
    sample_rate_hz: int = SAMPLE_RATE_HZ,
    max_duration_s: float | None = None,
    timeout_s: float | None = None,
    isolate: bool = True,
    crash_test: CrashTest | None = None,
    allowed_prefixes: tuple[str, ...] = (),
) -> pa.Table:
    """Decode stage: add `samples`, `channel_count` and `duration_s`; a row that cannot be decoded
    gets `error`. Embedded audio (`audio_bytes`) is decoded from memory and its bytes dropped here;
    a row whose `channels` is `split` keeps one run of samples per channel, channel after channel
    (`channel_count` of them); the others are mono (`channel_count` null).

    With `isolate`, the decoding runs in a forked child process (isolation.py): a recording that
    crashes it becomes an error row ("decode crashed the worker: signal 11 (SIGSEGV)") and the
    others are decoded as usual. `crash_test` is for tests only.
    """
    errors, items, todo = decode_inputs(table)
    decode = row_decoder(storage_options, sample_rate_hz, max_duration_s, timeout_s, crash_test, allowed_prefixes)
    decoded: dict[int, tuple[np.ndarray | None, float | None]] = {}
    for i, result in zip(todo, map_isolated(decode, [items[i] for i in todo], isolate=isolate)):
        if isinstance(result, Crash):
            errors[i] = result.reason("decode")
            continue
        samples, duration, errors[i] = result
        decoded[i] = samples, duration
    return decoded_table(table, errors, decoded)


def decode_inputs(table: pa.Table) -> tuple[list[str | None], list[tuple[str, bytes | None, bool]], list[int]]:
    """(each row's error, each row's (uri, embedded bytes or None, split channels), the rows to decode:
    those without an error)."""
    n = table.num_rows
    errors = table.column("error").to_pylist()
    uris = table.column("audio").to_pylist()
    data = table.column("audio_bytes").to_pylist() if "audio_bytes" in table.column_names else [None] * n
    split = (
        [mode == "split" for mode in table.column("channels").to_pylist()]
        if "channels" in table.column_names
        else [False] * n
    )
    return errors, list(zip(uris, data, split)), [i for i in range(n) if errors[i] is None]


def row_decoder(
    storage_options: dict | None,
    sample_rate_hz: int,
    max_duration_s: float | None,
    timeout_s: float | None,
    crash_test: CrashTest | None,
    allowed_prefixes: tuple[str, ...] = (),
):
    """`_decode_row` with the job's settings: one picklable function of a row's `decode_inputs` item."""
    return functools.partial(
        _decode_row,
        storage_options=storage_options,
        sample_rate_hz=sample_rate_hz,
        max_duration_s=max_duration_s,
        timeout_s=timeout_s,
        crash_test=crash_test,
        allowed_prefixes=tuple(allowed_prefixes),
    )


def decoded_table(
    table: pa.Table, errors: list[str | None], decoded: dict[int, tuple[np.ndarray | None, float | None]]
) -> pa.Table:
    """`table` with `errors`, and `duration_s`, `channel_count` and `samples` from `decoded`
    (row: (samples, mono or (channels, samples), duration)); rows not in it get nulls."""
    n = table.num_rows
    recordings: list[np.ndarray | None] = [None] * n
    channel_counts: list[int | None] = [None] * n
    durations: list[float | None] = [None] * n
    for i, (samples, duration) in decoded.items():
        durations[i] = duration
        if samples is not None:
            channel_counts[i] = samples.shape[0] if samples.ndim == 2 else None
            recordings[i] = samples.reshape(-1)  # channel-major: a view, no copy
    if "audio_bytes" in table.column_names:  # decoded: the bytes need not travel further
        table = table.drop_columns(["audio_bytes"])
    table = table.set_column(table.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
    table = table.append_column("duration_s", pa.array(durations, pa.float64()))
    table = table.append_column("channel_count", pa.array(channel_counts, pa.int32()))
    return table.append_column("samples", samples_to_arrow(recordings))
