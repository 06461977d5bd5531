"""Decoding: every container/codec the contract names, at 16 kHz mono float32, the right length."""

from __future__ import annotations

import subprocess

import numpy as np
import pyarrow as pa
import pytest
import soundfile as sf
import soxr

from conftest import FORMATS, SPEECH, ffmpeg_decode
from granite_batch.audio.decode import DecodeError, decode_table, load_recording, samples_from_arrow, samples_to_arrow


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_each_format_decodes_to_16k_mono_of_the_right_length(format_corpus, speech, name):
    recording = load_recording(str(format_corpus[name]))
    reference = ffmpeg_decode(format_corpus[name])

    assert recording.sample_rate_hz == 16000
    assert recording.samples.dtype == np.float32 and recording.samples.ndim == 1
    # Same file through another decoder (ffmpeg CLI): durations agree within 20 ms.
    assert abs(recording.duration_s - len(reference) / 16000) <= 0.020
    # And it is the speech at the level of its source, not silence or noise. Multi-channel files
    # carry the speech at half level on the extra channels, so the mean of channels is 0.75.
    # Lossy codecs and their padding move the level by a few per cent.
    source, rate = speech
    level = 0.75 if FORMATS[name][2] > 1 else 1.0
    source_16k = soxr.resample(source, rate, 16000, quality="HQ")
    rms = np.sqrt(np.sum(recording.samples**2) / len(source_16k))
    assert rms == pytest.approx(level * np.sqrt(np.mean(source_16k**2)), rel=0.08)


def test_downmix_averages_channels(format_corpus, speech):
    # speech.wav holds the speech at full level on the left and half level on the right.
    samples, rate = speech
    recording = load_recording(str(format_corpus["speech.wav"]))
    expected = soxr.resample(samples * 0.75, rate, 16000, quality="HQ")
    assert len(recording.samples) == pytest.approx(len(expected), abs=2)
    n = min(len(expected), len(recording.samples))
    # 16-bit quantisation of the source bounds the difference.
    assert np.max(np.abs(recording.samples[:n] - expected[:n])) < 2e-3


def test_matches_soundfile_and_soxr_exactly_for_flac():
    samples, rate = sf.read(SPEECH, dtype="float32")
    expected = soxr.resample(samples, rate, 16000, quality="HQ")
    recording = load_recording(str(SPEECH))
    assert len(recording.samples) == len(expected)
    assert np.max(np.abs(recording.samples - expected)) < 1e-5


@pytest.mark.parametrize(
    "name, reason",
    [
        ("empty.wav", "decode failed: empty file"),
        ("random.mp3", "decode failed:"),
        ("text.wav", "decode failed:"),
        ("no_audio.mp4", "decode failed: no audio stream in container"),
        ("missing.flac", "not found:"),
    ],
)
def test_broken_recordings_give_a_short_reason(broken_corpus, name, reason):
    with pytest.raises(DecodeError) as caught:
        load_recording(str(broken_corpus[name]))
    message = str(caught.value)
    assert message.startswith(reason)
    assert "Traceback" not in message and len(message) < 300


def test_too_long_recording_is_refused_while_decoding():
    with pytest.raises(DecodeError, match="too long: more than 1 s"):
        load_recording(str(SPEECH), max_duration_s=1.0)


def test_samples_round_trip_through_arrow_with_missing_rows():
    rows = [np.arange(5, dtype=np.float32), None, np.zeros(0, np.float32), np.ones(3, np.float32)]
    column = samples_to_arrow(rows)
    back = samples_from_arrow(
        pa.chunked_array(
            [
                column.slice(1),
            ]
        )
    )  # sliced arrays keep their offsets
    assert back[0] is None and len(back[1]) == 0 and back[2].tolist() == [1, 1, 1]
    assert samples_from_arrow(column)[0].tolist() == [0, 1, 2, 3, 4]


def test_decode_stage_marks_failures_and_skips_rows_already_failed(broken_corpus):
    table = pa.table(
        {
            "audio": [str(SPEECH), str(broken_corpus["empty.wav"]), str(SPEECH)],
            "error": [None, None, "unsupported language: 'xx'"],
        }
    )
    out = decode_table(table)
    assert out.column("error").to_pylist()[0] is None
    assert out.column("error").to_pylist()[1].startswith("decode failed: empty file")
    assert out.column("error").to_pylist()[2] == "unsupported language: 'xx'"
    durations = out.column("duration_s").to_pylist()
    assert durations[0] == pytest.approx(3.4845, abs=0.001) and durations[1] is None and durations[2] is None


@pytest.mark.parametrize("channels", [7, 8, 12, 16, 24, 64])
def test_recordings_of_many_channels_decode_to_their_mean(tmp_path, channels):
    # PyAV's planar frames of 8+ channels used to crash the decoding process (SIGSEGV).
    t = np.arange(16000) / 16000
    levels = np.linspace(0.1, 0.9, channels)
    planar = np.stack([level * np.sin(2 * np.pi * 440 * t) for level in levels], axis=1)
    path = tmp_path / f"{channels}ch.wav"
    sf.write(path, planar.astype(np.float32), 16000, subtype="FLOAT")
    recording = load_recording(str(path))
    assert recording.source_channels == channels
    assert recording.duration_s == pytest.approx(1.0)
    assert np.max(np.abs(recording.samples - planar.mean(axis=1))) < 1e-6


def test_eight_channel_aac_decodes(tmp_path):
    # A planar codec: the decoder itself hands out 8-plane frames (the issue's own recipe, as AAC).
    path = tmp_path / "7.1.m4a"
    subprocess.run(
        [
            "ffmpeg",
            "-v",
            "error",
            "-f",
            "lavfi",
            "-i",
            "sine=d=1:sample_rate=16000",
            "-ac",
            "8",
            "-c:a",
            "aac",
            str(path),
        ],
        check=True,
    )
    recording = load_recording(str(path))
    assert recording.source_channels == 8
    # ffmpeg's own decode of all eight channels, averaged as ours are.
    raw = subprocess.run(
        ["ffmpeg", "-v", "error", "-i", str(path), "-ar", "16000", "-f", "f32le", "-"], check=True, capture_output=True
    ).stdout
    reference = np.frombuffer(raw, dtype="<f4").reshape(-1, 8).mean(axis=1)
    assert abs(len(recording.samples) - len(reference)) <= 1024
    assert np.sqrt(np.mean(recording.samples**2)) == pytest.approx(np.sqrt(np.mean(reference**2)), rel=0.05)
    assert np.sqrt(np.mean(recording.samples**2)) > 0.005  # not silence


@pytest.mark.parametrize("name", ["en_weather.flac", "fr_gare.mp3"])
def test_a_sink_gets_the_samples_piece_by_piece_and_its_time_is_not_decoding_time(name):
    import time

    from conftest import SAMPLES

    whole = load_recording(str(SAMPLES / name)).samples
    count = []
    load_recording(str(SAMPLES / name), sink=count.append)
    # The sink's time adds up to twice the timeout whatever the piece count, while decoding a few
    # seconds of audio stays far inside it even on a loaded machine.
    timeout_s = 2.0
    pieces = []

    def slow(piece: np.ndarray) -> None:  # as the VAD between two pieces of a long recording
        pieces.append(piece)
        time.sleep(2 * timeout_s / len(count))

    recording = load_recording(str(SAMPLES / name), timeout_s=timeout_s, sink=slow)
    assert recording.samples is None and recording.length == len(whole) and len(pieces) == len(count)
    assert np.array_equal(np.concatenate(pieces), whole)  # the same samples, in order, none kept


def _decoded_through_the_converter(path) -> np.ndarray:
    """16 kHz mono the way every frame used to go: PyAV's resampler to interleaved float, then the downmix."""
    import av

    from granite_batch.audio.decode import _downmix, _interleaved_seconds

    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.codec_context.sample_rate
        converter = av.AudioResampler(format="flt", rate=rate)
        mono = np.concatenate([_downmix(x) for x in _interleaved_seconds(container, stream, converter, rate)])
    return mono if rate == 16000 else soxr.resample(mono, rate, 16000, quality="HQ")


@pytest.mark.parametrize("subtype", ["PCM_16", "PCM_24", "FLOAT"])
def test_frames_read_from_their_planes_give_the_converter_s_exact_samples(format_corpus, tmp_path, subtype):
    # s16 (FLAC, WAV), fltp (MP3, AAC, Opus) and flt frames skip PyAV's resampler (it cost as much as
    # decoding): the floats must be the very ones it gave; other formats (s32: 24-bit) still go through it.
    stereo = np.stack([np.sin(np.arange(48000) / 7.0), 0.3 * np.cos(np.arange(48000) / 3.0)], axis=1) * 0.7
    extra = tmp_path / f"stereo-{subtype}.flac" if subtype != "FLOAT" else tmp_path / "stereo-float.wav"
    sf.write(extra, stereo.astype(np.float32), 48000, subtype=subtype)
    for path in [*format_corpus.values(), extra]:
        got = load_recording(str(path)).samples
        reference = _decoded_through_the_converter(path)
        assert got.dtype == np.float32 and np.array_equal(got, reference), path.name
