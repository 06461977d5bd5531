"""Benchmark: peak memory and speed of decode + segmentation for hour-long recordings.

    python benchmarks/bench_segment.py [--hours 1 3] [--speech samples/en_weather.flac]

Builds each recording by repeating a speech clip between pauses of varied length, writes it as
FLAC to a temporary folder, then runs the decode and segment stages (`audio.decode_table`,
`segment.segment_blocks`, block by block as Ray Data takes them) on it in a fresh process per size,
so each peak is that recording's alone; in that process (`isolate=False`), so that the time and memory
a worker and its helper process share are counted whole. Then as the job runs it
(`decode_cut.decode_blocks`: decoded and cut in the helper, the worker taking one table of segments at
a time), with each process's own peak. Memory is the resident set's high-water mark (VmHWM), read after
loading the VAD model, after decoding and after segmenting; the peak of each stage is measured on
its own by resetting the mark in between (Linux `clear_refs`). Not a test: it only reports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from granite_batch.audio.decode import SAMPLE_RATE_HZ

DEFAULT_SPEECH = Path(__file__).resolve().parents[1] / "samples" / "en_weather.flac"
PAUSES_S = (0.3, 0.8, 1.5, 0.4, 3.0, 0.6, 6.0)
MB = 1024 * 1024


def write_long_recording(path: Path, speech: np.ndarray, hours: float, sample_rate_hz: int = SAMPLE_RATE_HZ) -> float:
    """Write speech clips separated by varied pauses (with a faint noise floor) to a FLAC file,
    streaming, until it lasts `hours`; return its duration in seconds."""
    import av

    rng = np.random.default_rng(0)
    total = int(hours * 3600 * sample_rate_hz)
    written = 0
    with av.open(str(path), "w", format="flac") as out:
        stream = out.add_stream("flac", rate=sample_rate_hz, layout="mono")
        i = 0
        while written < total:
            pause = np.zeros(int(PAUSES_S[i % len(PAUSES_S)] * sample_rate_hz), np.float32)
            piece = np.concatenate([speech, pause])[: total - written]
            piece = piece + rng.normal(0, 1e-3, len(piece)).astype(np.float32)
            pcm = np.clip(piece * 32767, -32768, 32767).astype(np.int16).reshape(1, -1)
            frame = av.AudioFrame.from_ndarray(pcm, format="s16", layout="mono")
            frame.sample_rate = sample_rate_hz
            for packet in stream.encode(frame):
                out.mux(packet)
            written += pcm.shape[1]
            i += 1
        for packet in stream.encode(None):
            out.mux(packet)
    return written / sample_rate_hz


def _high_water_mb(pid: int | str = "self") -> float:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _current_mb(pid: int | str = "self") -> float:
    try:
        with open(f"/proc/{pid}/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MB
    except OSError:  # not Linux: the high-water mark is the best there is
        return _high_water_mb()


def _reset_high_water(pid: int | str = "self") -> bool:
    """Start a new high-water mark at the current size (Linux >= 4.0); False where not possible."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as refs:
            refs.write("5")
        return True
    except OSError:
        return False


def measure(path: str, max_segment_s: float) -> dict:
    """Decode and segment one recording in this process; memory and times of each stage."""
    import pyarrow as pa

    from granite_batch.audio import decode as audio
    from granite_batch.audio import decode_cut, isolation, segment, vad

    vad.vad_model()
    segment.plan_segments(np.zeros(SAMPLE_RATE_HZ, np.float32), SAMPLE_RATE_HZ, max_segment_s)  # warm the JIT
    baseline = _current_mb()
    separate = _reset_high_water()
    row = pa.table({"audio": [path], "error": pa.array([None], pa.string())})

    wall, cpu = time.perf_counter(), time.process_time()
    # In this process (isolate=False): the work a worker and its helper share, timed and measured whole.
    decoded = audio.decode_table(row, isolate=False)
    decode_wall, decode_cpu = time.perf_counter() - wall, time.process_time() - cpu
    decode_peak = _high_water_mb()
    if decoded.column("error")[0].as_py() is not None:
        raise RuntimeError(decoded.column("error")[0].as_py())
    decode_duration = decoded.column("duration_s")[0].as_py()
    after_decode = _current_mb()
    if separate:
        _reset_high_water()

    wall, cpu = time.perf_counter(), time.process_time()
    # As Ray Data takes them: block by block, each handed on (here: all but its bounds dropped).
    segmented = pa.concat_tables(
        [
            block.select(["start_s", "end_s"])
            for block in segment.segment_blocks(decoded, SAMPLE_RATE_HZ, max_segment_s, isolate=False)
        ]
    )
    segment_wall, segment_cpu = time.perf_counter() - wall, time.process_time() - cpu
    segment_peak = _high_water_mb()

    del decoded
    # As the job runs it (decode_cut.decode_blocks): decoded and cut in the helper process, the worker
    # (this process) taking its segment tables one at a time; each process's own high-water mark.
    isolation.map_isolated(len, [b""])  # the helper, forked now: its own peak counts from here
    helper = isolation._pool[0] if isolation._pool else None
    helper_base = _current_mb(helper.pid) if helper is not None else None
    if separate:
        _reset_high_water()
        if helper is not None:
            _reset_high_water(helper.pid)
    worker_base = _current_mb()
    wall = time.perf_counter()
    cut_segments = sum(block.num_rows for block in decode_cut.decode_blocks(row, max_segment_s))
    helper_wall = time.perf_counter() - wall
    worker_peak = _high_water_mb()
    helper_peak = _high_water_mb(helper.pid) if helper is not None else None

    duration_s = decode_duration
    starts = [round(s * SAMPLE_RATE_HZ) for s in segmented.column("start_s").to_pylist()]
    ends = [round(e * SAMPLE_RATE_HZ) for e in segmented.column("end_s").to_pylist()]
    return {
        "audio_s": duration_s,
        "samples_mb": round(duration_s * SAMPLE_RATE_HZ * 4 / MB, 1),
        "baseline_mb": round(baseline, 1),  # Python, torch, pyarrow and the VAD model, loaded
        "decode_peak_mb": round(decode_peak, 1),
        "after_decode_mb": round(after_decode, 1),
        "segment_peak_mb": round(segment_peak, 1),
        "segment_extra_mb": round(segment_peak - after_decode, 1) if separate else None,
        "peak_above_baseline_mb": round(max(decode_peak, segment_peak) - baseline, 1),
        "decode_wall_s": round(decode_wall, 2),
        "decode_cpu_s": round(decode_cpu, 2),
        "segment_wall_s": round(segment_wall, 2),
        "segment_cpu_s": round(segment_cpu, 2),
        "segment_audio_s_per_cpu_s": round(duration_s / segment_cpu, 1),
        "segments": len(starts),
        "longest_segment_s": round(max(e - s for s, e in zip(starts, ends)) / SAMPLE_RATE_HZ, 2),
        # The job's path: the worker's and the helper's peaks, each above what it held before.
        "job_path_segments": cut_segments,
        "job_path_wall_s": round(helper_wall, 2),
        "job_path_worker_extra_mb": round(worker_peak - worker_base, 1) if separate else None,
        "job_path_helper_extra_mb": None
        if helper_peak is None or not separate
        else round(helper_peak - helper_base, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, nargs="+", default=[1.0, 3.0])
    parser.add_argument("--speech", default=str(DEFAULT_SPEECH), help="speech clip to repeat (any format)")
    parser.add_argument("--max-segment-s", type=float, default=30.0)
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: the fresh process per size
    args = parser.parse_args(argv)
    if args.measure:
        print(json.dumps(measure(args.measure, args.max_segment_s)))
        return 0

    from granite_batch.audio.decode import load_recording

    speech = load_recording(args.speech).samples
    print(
        f"{'hours':>5} {'samples MB':>10} {'baseline MB':>11} {'decode peak':>11} {'segment +MB':>11} "
        f"{'peak-base MB':>12} {'decode s':>8} {'segment cpu s':>13} {'audio s/cpu s':>13} {'segments':>8} "
        f"{'job: worker +MB':>15} {'helper +MB':>10}"
    )
    with tempfile.TemporaryDirectory(prefix="bench-segment-") as folder:
        for hours in args.hours:
            path = Path(folder) / f"long-{hours:g}h.flac"
            write_long_recording(path, speech, hours)
            result = subprocess.run(
                [sys.executable, __file__, "--measure", str(path), "--max-segment-s", str(args.max_segment_s)],
                capture_output=True,
                text=True,
                check=True,
            )
            r = json.loads(result.stdout.strip().splitlines()[-1])
            path.unlink()
            print(
                f"{hours:>5g} {r['samples_mb']:>10} {r['baseline_mb']:>11} {r['decode_peak_mb']:>11} "
                f"{r['segment_extra_mb']!s:>11} {r['peak_above_baseline_mb']:>12} {r['decode_wall_s']:>8} "
                f"{r['segment_cpu_s']:>13} {r['segment_audio_s_per_cpu_s']:>13} {r['segments']:>8} "
                f"{r['job_path_worker_extra_mb']!s:>15} {r['job_path_helper_extra_mb']!s:>10}"
            )
            print("      " + json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
