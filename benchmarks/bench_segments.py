"""Benchmark: segments as the unit of model work -- memory with long recordings, and batch shape.

    python benchmarks/bench_segments.py memory   [--minutes 10 60] [--recordings 8] [--repeat 1] [--jobs-dir jobs]
    python benchmarks/bench_segments.py batching [--clips 300] [--batch-size 32]

`memory` runs the whole job (`granite-batch run`, embedded Ray, tiny checkpoint) over N recordings
of each length and samples, every 0.25 s, the proportional set size (PSS, from
/proc/PID/smaps_rollup) summed over the job's whole process tree: the driver, Ray's own processes,
every worker and the shared object store they map. The peak of that sum is the job's machine
memory, measured apart from whatever else the machine runs. `--jobs-dir` runs another checkout's
package (e.g. an older commit's `jobs/`) for a before/after figure in the same conditions.

`batching` runs the job over a manifest of short clips (2-8 s, cut from samples/) and prints the
run summary's inference figures: segments per generate call and the padding fraction.

Not a test: it only reports. The last line is one JSON object with every figure.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "samples"
RATE = 16000
MB = 1024 * 1024


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as stat:
                    parent = int(stat.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(parent, []).append(int(entry))
    found, stack = [], [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(children.get(pid, []))
    return found


def _kind(pid: int) -> str:
    """What a process of the job is: its Ray process title (`ray::MapBatches(...)`) or program name."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            words = handle.read().split(b"\0")
    except OSError:
        return "gone"
    first = words[0].decode(errors="replace")
    if first.startswith("ray::"):
        return first.split(" ")[0][:60]
    name = os.path.basename(first)
    if name.startswith("python"):  # the script or module it runs
        rest = [w.decode(errors="replace") for w in words[1:3] if w]
        return " ".join([name, *[os.path.basename(w) for w in rest]])[:60]
    return name[:60]


def _pss_mb(pid: int) -> tuple[float, float]:
    """(PSS, the part of it in shared memory: Ray's object store, which workers map) in MB."""
    sizes = {"Pss:": 0.0, "Pss_Shmem:": 0.0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as rollup:
            for line in rollup:
                key = line.split(maxsplit=1)[0]
                if key in sizes:
                    sizes[key] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return sizes["Pss:"], sizes["Pss_Shmem:"]


def run_measured(command: list[str], env: dict) -> tuple[subprocess.CompletedProcess, float, dict[str, list]]:
    """Run `command`, sampling the PSS of its process tree; (the process, peak MB, by kind of process
    then: [MB, MB of it in shared memory, processes])."""
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    peak = [0.0]
    breakdown: dict[str, list] = {}  # PSS by kind of process at the peak
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            sizes = [(pid, *_pss_mb(pid)) for pid in _descendants(process.pid)]
            total = sum(size for _, size, _ in sizes)
            if total > peak[0]:
                peak[0] = total
                by_kind: dict[str, list[float]] = {}  # kind: [MB, of it in the object store, processes]
                for pid, size, shared in sizes:
                    figures = by_kind.setdefault(_kind(pid), [0.0, 0.0, 0])
                    figures[0] += size
                    figures[1] += shared
                    figures[2] += 1
                breakdown.clear()
                breakdown.update(by_kind)
            done.wait(0.25)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    done.set()
    sampler.join()
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr), peak[0], breakdown


def _job(manifest: Path, output: Path, model: Path, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "granite_batch.cli",
        "run",
        "--manifest",
        str(manifest),
        "--output",
        str(output),
        "--model",
        str(model),
        "--no-progress",
        *extra,
    ]


def _env(jobs_dir: Path) -> dict:
    # Ray's workers inherit the environment: the same package reaches every process.
    return {**os.environ, "PYTHONPATH": str(jobs_dir)}


def _summary(output: Path) -> dict:
    return json.loads(next((output / "runs").glob("*.json")).read_text())


def memory(args) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_segment import write_long_recording
    from granite_batch.audio.decode import load_recording
    from granite_batch.testing.tiny_model import write_tiny_model

    speech = load_recording(str(SAMPLES / "en_weather.flac")).samples
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-segments-") as folder:
        work = Path(folder)
        model = write_tiny_model(work / "tiny")
        for minutes in args.minutes:
            path = work / f"long-{minutes:g}min.flac"
            write_long_recording(path, speech, minutes / 60)
        # Sizes taken in turn, `repeat` rounds: one peak moves by hundreds of MB from run to run (which
        # stages overlap at the peak instant varies), so the ratio is that of the medians.
        for minutes in [m for _ in range(args.repeat) for m in args.minutes]:
            path = work / f"long-{minutes:g}min.flac"
            manifest = work / f"m-{minutes:g}.jsonl"
            manifest.write_text(
                "".join(json.dumps({"audio": str(path), "id": f"r{i}"}) + "\n" for i in range(args.recordings))
            )
            output = work / f"out-{minutes:g}-{len(results)}"
            start = time.perf_counter()
            extra = ["--max-new-tokens", str(args.max_new_tokens)]
            if args.object_store_mb is not None:
                config = work / "job.yaml"
                config.write_text(f"resources:\n  object_store_mb: {args.object_store_mb}\n")
                extra += ["--config", str(config)]
            done, peak, breakdown = run_measured(
                _job(manifest, output, model, extra), _env(Path(args.jobs_dir).resolve())
            )
            if done.returncode != 0:
                raise RuntimeError(done.stderr[-3000:])
            summary = _summary(output)
            results.append(
                {
                    "minutes": minutes,
                    "recordings": args.recordings,
                    "peak_pss_mb": round(peak),
                    "wall_s": round(time.perf_counter() - start, 1),
                    "rows_ok": summary["rows_ok"],
                    "samples_mb_per_recording": round(minutes * 60 * RATE * 4 / MB),
                    # Largest first.
                    "peak_by_process": {
                        kind: {"mb": round(size), "object_store_mb": round(shared), "processes": count}
                        for kind, (size, shared, count) in sorted(breakdown.items(), key=lambda item: -item[1][0])
                    },
                }
            )
            print(
                f"{minutes:>6g} min x {args.recordings}: peak PSS of the job's processes {peak:,.0f} MB, "
                f"{results[-1]['wall_s']} s, {summary['rows_ok']} rows ok",
                flush=True,
            )
            for kind, figures in list(results[-1]["peak_by_process"].items())[:8]:
                print(
                    f"         {figures['mb']:>7,} MB  {kind} ({figures['processes']} processes, "
                    f"{figures['object_store_mb']:,} MB of it shared memory)"
                )
    medians = {
        minutes: statistics.median(r["peak_pss_mb"] for r in results if r["minutes"] == minutes)
        for minutes in args.minutes
    }
    ratio = medians[args.minutes[-1]] / medians[args.minutes[0]]
    print(
        f"peak memory (median of {args.repeat}), {args.minutes[-1]:g} min against {args.minutes[0]:g} min: "
        f"{medians[args.minutes[-1]]:,.0f} / {medians[args.minutes[0]]:,.0f} MB = {ratio:.2f}x (goal <= 1.25x: "
        f"{'met' if ratio <= 1.25 else 'NOT met'})"
    )
    return {
        "memory": results,
        "median_peak_pss_mb": {f"{m:g}": round(v) for m, v in medians.items()},
        "ratio": round(ratio, 3),
        "repeat": args.repeat,
        "jobs_dir": str(Path(args.jobs_dir).resolve()),
        "object_store_mb": args.object_store_mb,
    }


def batching(args) -> dict:
    import soundfile as sf

    from granite_batch.audio.decode import load_recording
    from granite_batch.testing.tiny_model import write_tiny_model

    rng = np.random.default_rng(0)
    sources = [
        load_recording(str(p)).samples
        for p in sorted(SAMPLES.iterdir())
        if p.suffix in (".flac", ".mp3", ".ogg", ".m4a", ".wav")
    ]
    speech = np.concatenate(sources)
    with tempfile.TemporaryDirectory(prefix="bench-batching-") as folder:
        work = Path(folder)
        model = write_tiny_model(work / "tiny")
        rows = []
        for i in range(args.clips):
            length = int(rng.uniform(2.0, 8.0) * RATE)
            start = int(rng.integers(0, len(speech) - length))
            path = work / f"clip-{i:04d}.wav"
            sf.write(path, speech[start : start + length], RATE)
            rows.append({"audio": str(path), "id": f"clip-{i:04d}"})
        manifest = work / "clips.jsonl"
        manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
        output = work / "out"
        start = time.perf_counter()
        done = subprocess.run(
            _job(manifest, output, model, ["--batch-size", str(args.batch_size), "--max-new-tokens", "24"]),
            capture_output=True,
            text=True,
            env=_env(REPO / "jobs"),
        )
        if done.returncode != 0:
            raise RuntimeError(done.stderr[-3000:])
        summary = _summary(output)
    (figures,) = summary["inference"].values()
    share = figures["mean_segments_per_call"] / args.batch_size
    print(
        f"{args.clips} clips of 2-8 s, batch size {args.batch_size}: {figures['segments']} segments in "
        f"{figures['generate_calls']} generate calls, {figures['mean_segments_per_call']} per call "
        f"({share:.0%} of the batch size; goal >= 80%: {'met' if share >= 0.8 else 'NOT met'}), padding "
        f"{figures['padding_fraction']:.1%} "
        f"(goal < 15%: {'met' if figures['padding_fraction'] < 0.15 else 'NOT met'}); "
        f"{time.perf_counter() - start:.0f} s"
    )
    return {"batching": figures, "clips": args.clips, "batch_size": args.batch_size, "share": round(share, 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    modes = parser.add_subparsers(dest="mode", required=True)
    mem = modes.add_parser("memory")
    mem.add_argument("--minutes", type=float, nargs="+", default=[10.0, 60.0])
    mem.add_argument("--recordings", type=int, default=8)
    mem.add_argument("--repeat", type=int, default=1, help="rounds over the sizes; the ratio is of the medians")
    mem.add_argument("--max-new-tokens", type=int, default=8, help="the same for every size (default 8)")
    mem.add_argument("--object-store-mb", type=float, help="the job's resources.object_store_mb (default: Ray's)")
    mem.add_argument("--jobs-dir", default=str(REPO / "jobs"), help="the package's source root to run")
    bat = modes.add_parser("batching")
    bat.add_argument("--clips", type=int, default=300)
    bat.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args(argv)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load = os.getloadavg()
    figures = memory(args) if args.mode == "memory" else batching(args)
    print(
        json.dumps(
            {
                "bench": f"segments-{args.mode}",
                "date": started,
                "cpus": os.cpu_count(),
                "load_average_start": [round(x, 2) for x in load],
                **figures,
            },
            sort_keys=True,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
