"""Long recordings: over a quarter of an hour of real speech (espeak-ng) with pauses of every length.

The recording is built here from known pieces, so where speech is, and how loud each moment is,
is known independently of the VAD: segments must stay within the limit, start and end in quiet
moments, cover the speech and leave long silences out. Then the real job runs on it.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads
import pytest
import soundfile as sf
import soxr
import srt
import webvtt

from conftest import run_cli, write_jsonl
from granite_batch.audio import segment
from granite_batch.audio.decode import load_recording
from granite_batch.audio.segment import plan_segments
from granite_batch.audio.vad import VadOptions

RATE = 16000
FRAME = 320  # 20 ms, for measuring loudness
SENTENCES = [
    "The weather today is mild, with a light breeze from the west.",
    "Later in the afternoon, clouds will gather over the hills.",
    "Our train leaves the central station at half past eight every morning.",
    "Please remember to bring your ticket and a form of identification.",
    "The library will be closed on Sunday for the annual inventory.",
    "She opened the window, looked at the garden, and decided to stay inside.",
    "Fresh bread, cheese and apples were sold at the market near the river.",
    "In the evening the museum offers free guided tours in three languages.",
    "He counted the boxes twice before signing the delivery form.",
    "The committee will publish its report at the end of the month.",
    "A small boat drifted slowly along the canal under the old stone bridge.",
    "Children played football in the park until the street lights came on.",
    "Turn left at the bakery, then walk straight on for about five minutes.",
    "The meeting has been moved to Thursday morning at ten o'clock.",
    "Our new neighbours brought a cake to welcome us to the street.",
    "The doctor said the results would be ready by the end of the week.",
]
PAUSES_S = [0.15, 0.25, 0.4, 0.6, 0.9, 1.3, 2.0, 3.0, 5.0, 8.0]
LONG_SILENCE_S = 45.0  # longer than any segment may be: must not end up inside one


def espeak(text: str, path: Path, speed: int, pitch: int) -> np.ndarray:
    subprocess.run(
        ["/usr/bin/espeak-ng", "-v", "en-us", "-s", str(speed), "-p", str(pitch), "-w", str(path), text],
        check=True,
        capture_output=True,
    )
    samples, rate = sf.read(path, dtype="float32")
    return soxr.resample(samples, rate, RATE).astype(np.float32)


@pytest.fixture(scope="session")
def long_recording(tmp_path_factory) -> dict:
    """~17.3 minutes at 16 kHz: >= 10 minutes of espeak-ng speech, pauses from 0.15 s to 45 s, an
    isolated one-word answer, a faint noise floor, then silence to 10 s past `long_recording_s` (so
    the job cuts it in the helper that decodes it); written as FLAC, with where the speech is."""
    folder = tmp_path_factory.mktemp("long")
    clips = [
        espeak(text, folder / f"{i}-{speed}.wav", speed, pitch)
        for i, text in enumerate(SENTENCES)
        for speed, pitch in ((150, 40), (185, 60))
    ]
    yes = espeak("Yes.", folder / "yes.wav", 160, 50)
    rng = np.random.default_rng(7)
    parts, speech, position = [], [], 0

    def add(samples: np.ndarray, is_speech: bool) -> None:
        nonlocal position
        parts.append(samples)
        if is_speech:
            speech.append((position, position + len(samples)))
        position += len(samples)

    def silence(seconds: float) -> None:
        add(np.zeros(int(seconds * RATE), np.float32), False)

    silence(1.5)
    i = 0
    while sum(end - start for start, end in speech) < 620 * RATE:
        add(clips[rng.integers(len(clips))], True)
        if i == 40:
            silence(LONG_SILENCE_S)
        elif i == 80:
            silence(12.0)
            add(yes, True)  # a lone word between long silences is still speech
            silence(15.0)
        elif i % 20 < 8:
            silence(rng.choice(PAUSES_S[:3]))  # a run of quick talk: long stretches, few pauses
        else:
            silence(rng.choice(PAUSES_S))
        i += 1
    # Past the length from which the job cuts a recording where it decodes it (decode_cut.decode_blocks).
    silence(max(2.0, segment.long_recording_s() + 10.0 - position / RATE))
    clean = np.concatenate(parts)
    noisy = clean + rng.normal(0.0, 1e-3, len(clean)).astype(np.float32)
    path = folder / "long.flac"
    sf.write(path, noisy, RATE, subtype="PCM_16")
    return {
        "path": path,
        "clean": clean,
        "speech": speech,
        "yes": speech[81],
        "long_silence": _silence_after(speech, 40),
    }


def _silence_after(speech: list[tuple[int, int]], index: int) -> tuple[int, int]:
    return speech[index][1], speech[index + 1][0]


def frame_energy(samples: np.ndarray) -> np.ndarray:
    usable = len(samples) // FRAME * FRAME
    return np.square(samples[:usable], dtype=np.float64).reshape(-1, FRAME).mean(axis=1)


def voiced_frames(recording: dict) -> np.ndarray:
    """20 ms frames inside the inserted speech that carry sound (espeak's own gaps are silent)."""
    energy = frame_energy(recording["clean"])
    inside = np.zeros(len(energy), bool)
    for start, end in recording["speech"]:
        inside[start // FRAME : end // FRAME] = True
    return inside & (energy > 1e-4)


@pytest.fixture(scope="session")
def decoded(long_recording) -> np.ndarray:
    return load_recording(str(long_recording["path"])).samples


def test_the_recording_is_long_real_speech(long_recording, decoded):
    speech_s = sum(end - start for start, end in long_recording["speech"]) / RATE
    assert speech_s >= 600 and len(decoded) == len(long_recording["clean"])
    assert len(decoded) / RATE > segment.long_recording_s()  # the job cuts it where it decodes it
    assert voiced_frames(long_recording).sum() * FRAME / RATE > 400


@pytest.mark.parametrize(
    "max_segment_s, options",
    [
        (30.0, VadOptions()),
        (12.0, VadOptions()),
        # Pauses under 2 s no longer end speech: long speech regions must be cut inside, at quiet points.
        (30.0, VadOptions(min_silence_s=2.0)),
    ],
    ids=["30s", "12s", "30s-long-regions"],
)
def test_segments_cover_the_speech_within_the_limit_and_cut_in_quiet(long_recording, decoded, max_segment_s, options):
    bounds = plan_segments(decoded, RATE, max_segment_s, options)
    n = len(decoded)
    starts = [start for start, _ in bounds]
    assert starts == sorted(set(starts)) and starts[0] >= 0 and bounds[-1][1] <= n
    assert all(0 < end - start <= max_segment_s * RATE for start, end in bounds)
    assert all(a[1] <= b[0] for a, b in zip(bounds, bounds[1:]))  # in order, no overlap

    clean = long_recording["clean"]
    voiced = voiced_frames(long_recording)
    typical = np.median(frame_energy(clean)[voiced])
    for boundary in {b for bound in bounds for b in bound} - {0, n}:
        around = np.square(clean[boundary - FRAME // 2 : boundary + FRAME // 2], dtype=np.float64).mean()
        assert around < 0.01 * typical, f"boundary at {boundary / RATE:.2f} s is not in a quiet moment"

    covered = np.zeros(len(voiced), bool)
    for start, end in bounds:
        covered[start // FRAME : -(-end // FRAME)] = True
    assert (covered & voiced).sum() >= 0.95 * voiced.sum()
    yes_start, yes_end = long_recording["yes"]
    assert covered[yes_start // FRAME : yes_end // FRAME][voiced[yes_start // FRAME : yes_end // FRAME]].all()
    # Pure silence is dropped: the 45 s pause is (nearly) outside every segment, and every
    # segment holds speech.
    quiet_start, quiet_end = long_recording["long_silence"]
    inside = sum(max(0, min(end, quiet_end) - max(start, quiet_start)) for start, end in bounds)
    assert inside < 1.0 * RATE
    assert all(voiced[start // FRAME : end // FRAME].any() for start, end in bounds)
    if max_segment_s == 30.0:
        assert covered.mean() < 0.9 and len(bounds) < 2 * n / (max_segment_s * RATE)  # merged, not per word


@pytest.mark.parametrize("max_segment_s", [30.0, 12.0])
def test_without_the_vad_segments_tile_the_recording_and_every_join_is_in_quiet(long_recording, decoded, max_segment_s):
    """The CTC models' cut (VadOptions.vad False): nothing dropped or doubled, and each join, like the
    VAD path's, falls in a quiet moment, between words, never inside one."""
    bounds = plan_segments(decoded, RATE, max_segment_s, VadOptions(vad=False))
    n = len(decoded)
    assert bounds[0][0] == 0 and bounds[-1][1] == n and all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert all(0 < end - start <= max_segment_s * RATE for start, end in bounds)
    clean = long_recording["clean"]
    typical = np.median(frame_energy(clean)[voiced_frames(long_recording)])
    for _, boundary in bounds[:-1]:
        around = np.square(clean[boundary - FRAME // 2 : boundary + FRAME // 2], dtype=np.float64).mean()
        assert around < 0.01 * typical, f"join at {boundary / RATE:.2f} s is not in a quiet moment"
    # Few more segments than the limit needs: each is cut in the second half of its window.
    assert len(bounds) <= 2 * n / (max_segment_s * RATE) + 1


@pytest.fixture(scope="module")
def long_job(tmp_path_factory, tiny_model_dir, long_recording):
    """The real job over the long recording, a silent one and a too-short one, with subtitles."""
    work = tmp_path_factory.mktemp("long-job")
    rng = np.random.default_rng(3)
    sf.write(work / "silence.flac", rng.normal(0, 1e-3, 40 * RATE).astype(np.float32), RATE, subtype="PCM_16")
    sf.write(work / "blip.wav", np.full(800, 0.3, np.float32), RATE)  # 50 ms
    manifest = write_jsonl(
        work / "manifest.jsonl",
        [
            {"audio": str(long_recording["path"]), "id": "long/talk"},
            {"audio": str(work / "silence.flac"), "id": "silence"},
            {"audio": str(work / "blip.wav"), "id": "blip"},
        ],
    )
    output = work / "out"
    result = run_cli(
        [
            "run",
            "--manifest",
            str(manifest),
            "--output",
            str(output),
            "--model",
            str(tiny_model_dir),
            "--max-new-tokens",
            "4",
            "--subtitles",
            "srt,vtt",
            "--word-timestamps",
            "--no-progress",
            "--run-id",
            "long-run",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    table = pads.dataset(output / "transcripts", format="parquet", partitioning="hive").to_table()
    return {"rows": {row["id"]: row for row in table.to_pylist()}, "output": output, "stdout": result.stdout}


def test_job_writes_ordered_timestamped_segments(long_job, decoded):
    row = long_job["rows"]["long/talk"]
    assert row["error"] is None and row["duration_s"] == pytest.approx(len(decoded) / RATE)
    expected = plan_segments(decoded, RATE, 30.0)
    assert [(s["start"], s["end"]) for s in row["segments"]] == [(a / RATE, b / RATE) for a, b in expected]
    assert row["text"] == " ".join(s["text"] for s in row["segments"] if s["text"])
    summary = json.loads((long_job["output"] / "runs" / "long-run.json").read_text())
    assert summary["config"]["subtitles"] == ["srt", "vtt"] and summary["rows_failed"] == 0


def test_silent_and_too_short_recordings_have_empty_text_and_no_segments(long_job):
    for row_id in ("silence", "blip"):
        row = long_job["rows"][row_id]
        assert row["error"] is None and row["text"] == "" and row["segments"] == [], row


def test_job_gives_words_in_their_segments(long_job):
    row = long_job["rows"]["long/talk"]
    for part in row["segments"]:
        words = part["words"]
        assert "".join(w["text"] for w in words) == "".join(part["text"].split())
        assert all(part["start"] <= w["start"] < w["end"] <= part["end"] for w in words)
        assert all(a["start"] <= b["start"] for a, b in zip(words, words[1:]))
        assert part["avg_logprob"] < 0
    assert any(part["words"] for part in row["segments"])
    summary = json.loads((long_job["output"] / "runs" / "long-run.json").read_text())
    figures = next(iter(summary["inference"].values()))
    assert figures["low_confidence_segments"] == len(row["segments"]) and figures["low_confidence_fraction"] == 1.0
    assert (
        f"low confidence ({next(iter(summary['inference']))}): {len(row['segments'])} segments (100.0%"
        in long_job["stdout"]
    )


def test_job_writes_subtitles_per_recording_cut_at_words(long_job):
    row = long_job["rows"]["long/talk"]
    words = [w for s in row["segments"] for w in s["words"]]
    folder = long_job["output"] / "subtitles"
    assert sorted(p.name for p in folder.rglob("*") if p.is_file()) == ["long%2Ftalk.srt", "long%2Ftalk.vtt"]

    parsed = list(srt.parse((folder / "srt" / "long%2Ftalk.srt").read_text(encoding="utf-8")))
    assert [s.index for s in parsed] == list(range(1, len(parsed) + 1))
    assert " ".join(s.content.replace("\n", " ") for s in parsed).split() == [w["text"] for w in words]
    starts = {round(w["start"], 3) for w in words}
    for subtitle in parsed:
        start, end = subtitle.start.total_seconds(), subtitle.end.total_seconds()
        assert round(start, 3) in starts and 0 < end - start <= 7.0 + 1e-3
        lines = subtitle.content.split("\n")
        # The tiny model's gibberish has words longer than a line: those stand alone on theirs.
        assert len(lines) <= 2 and all(len(line) <= 42 or " " not in line for line in lines)

    captions = webvtt.read(str(folder / "vtt" / "long%2Ftalk.vtt")).captions
    assert [(vtt_seconds(c.start), vtt_seconds(c.end)) for c in captions] == [
        (s.start.total_seconds(), s.end.total_seconds()) for s in parsed
    ]
    assert captions[-1].end_in_seconds <= row["duration_s"] + 1.0


def vtt_seconds(timestamp: str) -> float:
    hours, minutes, rest = timestamp.split(":")
    return round(int(hours) * 3600 + int(minutes) * 60 + float(rest), 3)  # to the millisecond VTT writes
