"""What the whole job costs in CPU time per audio second, and where it goes.

1. The whole job: a real `granite-batch run` (its own process, its own local Ray) with the tiny
   TurboCTC checkpoint (`granite_speech5_ctc`) over a large and a small manifest of generated speech
   (FLAC, MP3, AAC at 44.1 kHz and Opus at 48 kHz, stereo; long recordings and short clips). The CPU
   time of every process of each run (driver, raylet, GCS, workers, decode and VAD helpers) is read
   from a cgroup (cpuacct, when run as root) or else from rusage of the reaped process tree (which
   misses processes Ray does not reap). At the margin, (CPU s of the large run - of the small) /
   (audio s of the large - of the small): start-up costs (Ray, imports, the model) cancel.
2. Where it goes: the same stage code on the same files, in this process, one stage at a time (read,
   decode and downmix, resample, VAD and segmentation, transport, features, model, assembly, write);
   what the in-process stages do not explain is Ray's and the job's own share.
3. The limit beside it: PyAV's decoding alone, in process, on the same files, per codec.

Printed as "1 CPU s per N audio s", with the cores per GPU that implies at 280x (granite-4.0-1b-speech),
3,000x and 12,600x (granite-speech-5.0-470m-turboctc) real time, then one JSON line with every
figure unrounded. Generated audio is kept in `--cache-dir` and reused. Reproduce:
`python benchmarks/bench_cpu_cost.py` (as root for the cgroup); `--tiny` runs it at toy sizes.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pipeline import CODECS, SOURCE_RATE_HZ, encode, speech_source  # noqa: E402

SPEEDS_X = (280.0, 3000.0, 12600.0)  # published real-time factors: 4.0-1b, a round mid point, TurboCTC
GOAL_AUDIO_S_PER_CPU_S = 1050.0  # 12 cores keep one H200 busy at 12,600x
CGROUP_ROOT = Path("/sys/fs/cgroup/cpuacct")
STAGES = ("read", "decode", "resample", "segment", "transport", "features", "model", "assembly", "write")


def make_audio(cache: Path, long_s: float, longs: int, clips: int, clip_s: tuple[float, float]) -> dict:
    """{codec: [(path, seconds)]}: `longs` recordings of `long_s` and `clips` clips of clip_s[0]..clip_s[1]
    seconds per codec, each cut from a different place of the speech; made once into `cache`."""
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(33)
    lengths = [long_s] * longs + [float(x) for x in np.round(rng.uniform(*clip_s, clips), 2)]
    source = None
    files: dict[str, list[tuple[str, float]]] = {}
    for codec, (_, _, suffix, _, _) in CODECS.items():
        files[codec] = []
        for i, seconds in enumerate(lengths):
            path = cache / f"{codec}-{i:03d}-{seconds:g}s{suffix}"
            if not path.is_file():
                if source is None:
                    source = speech_source(max(lengths) + 60.0)
                start = int((i * 7.3 % 60.0) * SOURCE_RATE_HZ)
                partial = path.with_name("partial-" + path.name)
                encode(partial, np.ascontiguousarray(source[:, start : start + int(seconds * SOURCE_RATE_HZ)]), codec)
                partial.rename(path)
            files[codec].append((str(path), seconds))
    return files


def write_manifest(path: Path, files: list[tuple[str, float]]) -> float:
    """A JSON Lines manifest of `files`; returns their audio seconds."""
    with open(path, "w", encoding="utf-8") as handle:
        for i, (audio, _) in enumerate(files):
            handle.write(json.dumps({"id": f"cpu-{i:05d}", "audio": audio, "language": "en"}) + "\n")
    return sum(seconds for _, seconds in files)


class CpuMeter:
    """CPU seconds of a child process and everything it starts: a cpuacct cgroup of its own where this
    process may make one, else rusage of the reaped children (which misses what Ray leaves unreaped)."""

    def __init__(self, name: str):
        self.group = CGROUP_ROOT / f"granite-bench-{os.getpid()}-{name}"
        try:
            self.group.mkdir()
            self.method = "cgroup"
        except OSError:
            self.method = "rusage"

    def run(self, argv: list[str], env: dict, timeout_s: float) -> tuple[float, float, subprocess.CompletedProcess]:
        """(CPU seconds, wall seconds, the finished process) of `argv`."""
        procs = self.group / "cgroup.procs"

        def join() -> None:  # in the child, before exec: it and all it starts are counted
            procs.write_text(str(os.getpid()))

        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        done = subprocess.run(
            argv,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            preexec_fn=join if self.method == "cgroup" else None,
        )
        wall = time.perf_counter() - start
        if self.method == "rusage":
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            return after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime, wall, done
        deadline = time.monotonic() + 60
        while procs.read_text().split() and time.monotonic() < deadline:
            time.sleep(0.2)  # Ray's processes leave a moment after the driver
        for pid in procs.read_text().split():  # still there after a minute: ours to end
            try:
                os.kill(int(pid), 9)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        cpu = int((self.group / "cpuacct.usage").read_text()) / 1e9
        try:
            self.group.rmdir()
        except OSError:
            pass
        return cpu, wall, done


def run_job(manifest: Path, output: Path, model_dir: Path, name: str, timeout_s: float, segmentation: str) -> dict:
    """One `granite-batch run` of `manifest` in its own process (and its own local Ray): CPU and wall s."""
    env = dict(os.environ, RAY_ADDRESS="local", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in [str(_jobs_dir()), env.get("PYTHONPATH", "")] if p)
    argv = [sys.executable, "-m", "granite_batch.cli", "run", "--manifest", str(manifest), "--output", str(output)]
    argv += ["--model", str(model_dir), "--device", "cpu", "--run-id", name, "--no-progress", "--no-lease"]
    config = output.with_name(f"{name}-config.yaml")
    config.write_text(f"segmentation: {segmentation}\n", encoding="utf-8")
    argv += ["--config", str(config)]
    meter = CpuMeter(name)
    cpu, wall, done = meter.run(argv, env, timeout_s)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: granite-batch run exited {done.returncode}: {done.stderr[-3000:]}")
    rows, ok = _rows_written(output)
    return {"cpu_s": cpu, "wall_s": wall, "method": meter.method, "rows": rows, "rows_ok": ok}


def _jobs_dir() -> Path:
    import granite_batch

    return Path(granite_batch.__file__).resolve().parents[1]


def _rows_written(output: Path) -> tuple[int, int]:
    import pyarrow.dataset as pads

    table = pads.dataset(str(output / "transcripts"), format="parquet", partitioning="hive").to_table(columns=["error"])
    return table.num_rows, table.column("error").null_count


def pyav_alone(files: dict) -> dict:
    """Per codec, audio s per CPU s of PyAV decoding alone in this process (demux, decode, float),
    no downmix or resampling: the limit no job can pass without decoding less."""
    import av

    out = {}
    for codec, entries in files.items():
        cpu = audio_s = 0.0
        for path, seconds in entries:
            start = time.process_time()
            with av.open(path) as container:
                for _ in container.decode(container.streams.audio[0]):
                    pass
            cpu += time.process_time() - start
            audio_s += seconds
        out[codec] = {"audio_s": audio_s, "cpu_s": cpu, "x": audio_s / cpu}
    return out


def stage_costs(files: list[tuple[str, float]], model_dir: Path, work: Path, segmentation: str) -> dict:
    """CPU seconds of each stage of the job, run in this process on `files` with the job's own code."""
    import av
    import pyarrow as pa
    import soxr
    import torch

    from granite_batch.audio import decode as dec
    from granite_batch.audio import segment
    from granite_batch.audio.isolation import _read_message, _write_message
    from granite_batch.config import load_config
    from granite_batch.inference.assemble import RecordingAssembler
    from granite_batch.inputs.manifest import read_manifest
    from granite_batch.inputs.rows import Defaults
    from granite_batch.output.writer import TranscriptWriter
    from granite_batch.pipeline import Transcriber, actor_batch_rows, load_options, request_flags, segment_options
    from granite_batch.run.transcription import resolve_job_models
    from granite_batch.schema import transcript_schema
    from granite_batch.storage import OutputRoot

    torch.set_num_threads(1)  # as Ray runs each task and actor here
    manifest_path = work / "stages.jsonl"
    write_manifest(manifest_path, files)
    config = load_config(
        None,
        {
            "manifest": str(manifest_path),
            "output": str(work / "stages-out"),
            "model": str(model_dir),
            "segmentation": segmentation,
        },
    )
    cpu = dict.fromkeys(STAGES, 0.0)
    clock = time.process_time

    def timed(stage: str, fn, *args, **kwargs):
        start = clock()
        result = fn(*args, **kwargs)
        cpu[stage] += clock() - start
        return result

    manifest = read_manifest(config.manifest, Defaults.from_config(config), config.storage_options)
    model = resolve_job_models(config)[0]
    transcriber = Transcriber(model, load_options(config, "cpu"), request_flags(config), "s")
    cut_options = segment_options(config, model.profile)  # with or without the VAD, as the job
    speech_model = transcriber.speech_model
    extractor = speech_model.feature_extractor
    writer = TranscriptWriter(OutputRoot(config.output), "s", transcript_schema(manifest.table.schema), 100_000, 3600.0)
    assembler = RecordingAssembler()
    actor_rows = actor_batch_rows(*config.model_batch(gpu=False), config.max_segment_s)
    table = manifest.table
    audio_s = 0.0
    for offset in range(0, table.num_rows, 16):  # the pipeline's blocks of at most 16 recordings
        block = table.slice(offset, 16)
        decoded = {}
        for row, path in enumerate(block.column("audio").to_pylist()):
            data = timed("read", Path(path).read_bytes)
            with av.open(io.BytesIO(data)) as probe:
                rate = probe.streams.audio[0].codec_context.sample_rate
            # The job's decoding (demux, decode, downmix) at the source's rate, then its resampling: soxr
            # HQ fed a second at a time, as audio.decode does.
            mono = timed("decode", dec.decode_audio, io.BytesIO(data), sample_rate_hz=rate).samples
            resampler = soxr.ResampleStream(rate, dec.SAMPLE_RATE_HZ, 1, dtype="float32", quality="HQ")
            pieces = [
                timed("resample", resampler.resample_chunk, mono[i : i + rate], last=i + rate >= len(mono))
                for i in range(0, len(mono), rate)
            ]
            samples = np.concatenate(pieces)
            # The decode helper hands the samples to its worker through a pipe (isolation.py).
            samples = timed("transport", _through_pipe, samples, _write_message, _read_message)
            decoded[row] = samples, len(samples) / dec.SAMPLE_RATE_HZ
            audio_s += len(samples) / dec.SAMPLE_RATE_HZ
        errors = [None] * block.num_rows
        table16 = dec.decoded_table(block, errors, decoded)
        segments = timed(
            "segment", segment.segment_table, table16, dec.SAMPLE_RATE_HZ, config.max_segment_s, cut_options, False
        )
        # Ray moves each block between processes as Arrow IPC: once to the segment task, once to the actor.
        table16 = timed("transport", _through_ipc, table16, pa)
        segments = timed("transport", _through_ipc, segments, pa)
        results = []
        for start_row in range(0, segments.num_rows, actor_rows):
            part = segments.slice(start_row, actor_rows)
            clips = [s for s in dec.samples_from_arrow(part.column("samples")) if s is not None]
            timed("features", _features, extractor, clips)
            results.append(timed("model", transcriber, part))
        # The model's call computed the features again: what they cost is the features' line, not the model's.
        done = timed("assembly", assembler.add, timed("transport", _through_ipc, pa.concat_tables(results), pa))
        if done is not None:
            timed("write", writer.write, done)
    cpu["model"] = max(0.0, cpu["model"] - cpu["features"])
    timed("write", writer.close)
    return {"audio_s": audio_s, "cpu_s": cpu, "total_cpu_s": sum(cpu.values())}


def _features(extractor, clips: list[np.ndarray]) -> None:
    """The model's log-mel features of each segment, on the CPU, as its actor computes them (models/ctc.py)."""
    import torch

    for clip in clips:
        extractor(torch.tensor(clip), sampling_rate=extractor.sampling_rate, return_tensors="pt")


def _through_pipe(samples: np.ndarray, write, read) -> np.ndarray:
    """`samples` sent through an OS pipe the way the helper process sends them (pickle 5, out of band)."""
    r, w = os.pipe()
    sender = threading.Thread(target=lambda: (write(w, 2, samples), os.close(w)))
    sender.start()
    with os.fdopen(r, "rb") as pipe:
        _, received = read(pipe)
    sender.join()
    return received


def _through_ipc(table, pa):
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as stream:
        stream.write_table(table)
    return pa.ipc.open_stream(sink.getvalue()).read_all()


def summarise(large: dict, small: dict, stages: dict, limit: dict) -> dict:
    """The marginal figure, cores per GPU and the stage breakdown, from the measurements (unrounded)."""
    audio = large["audio_s"] - small["audio_s"]
    cpu = large["cpu_s"] - small["cpu_s"]
    per_cpu_s = audio / cpu
    stage_x = {k: stages["audio_s"] / v for k, v in stages["cpu_s"].items() if v > 0}
    in_process_x = stages["audio_s"] / stages["total_cpu_s"]
    # What a GPU takes off the CPU: the log-mel features and the model (here the tiny one, run on the CPU),
    # at their in-process cost per audio second, over the marginal audio.
    on_gpu = (stages["cpu_s"]["features"] + stages["cpu_s"]["model"]) / stages["audio_s"] * audio
    host_x = audio / (cpu - on_gpu)
    limit_audio = sum(v["audio_s"] for v in limit.values())
    limit_cpu = sum(v["cpu_s"] for v in limit.values())
    return {
        "marginal_audio_s": audio,
        "marginal_cpu_s": cpu,
        "audio_s_per_cpu_s": per_cpu_s,
        "goal_audio_s_per_cpu_s": GOAL_AUDIO_S_PER_CPU_S,
        "goal_met": per_cpu_s >= GOAL_AUDIO_S_PER_CPU_S,
        "marginal_on_gpu_cpu_s": on_gpu,
        "host_audio_s_per_cpu_s": host_x,
        "goal_met_on_gpu_node": host_x >= GOAL_AUDIO_S_PER_CPU_S,
        "cores_per_gpu": {f"{x:g}": x / host_x for x in SPEEDS_X},
        "stage_x": stage_x,
        "stage_share": {k: v / stages["total_cpu_s"] for k, v in stages["cpu_s"].items()},
        "in_process_x": in_process_x,
        # The job's CPU per audio second beyond the stages' own: Ray, processes, the driver.
        "outside_stages_share": 1.0 - (1.0 / in_process_x) / (1.0 / per_cpu_s),
        "pyav_alone_x": limit_audio / limit_cpu,
    }


def report(results: dict) -> str:
    s = results["summary"]
    load = " ".join(f"{x:.2f}" for x in results["load_average_start"])
    lines = [
        f"granite-batch CPU cost bench, {results['date']}, {results['cpus']} CPUs, load average {load} at the start",
        f"whole job (tiny TurboCTC checkpoint, segmentation {results['segmentation']}, CPU time of every process "
        f"by {results['large']['method']}):",
        f"   large manifest {results['large']['audio_s']:.0f} audio s, {results['large']['rows']} rows: "
        f"{results['large']['cpu_s']:.1f} CPU s ({results['large']['wall_s']:.1f} s wall)",
        f"   small manifest {results['small']['audio_s']:.0f} audio s, {results['small']['rows']} rows: "
        f"{results['small']['cpu_s']:.1f} CPU s ({results['small']['wall_s']:.1f} s wall)",
        f"   at the margin: 1 CPU s per {s['audio_s_per_cpu_s']:.0f} audio s "
        f"(goal 1 per {GOAL_AUDIO_S_PER_CPU_S:.0f}: {'met' if s['goal_met'] else 'NOT met'})",
        f"   without the features and the model (a GPU's work; their in-process cost taken off): 1 CPU s per "
        f"{s['host_audio_s_per_cpu_s']:.0f} audio s (goal: {'met' if s['goal_met_on_gpu_node'] else 'NOT met'})",
        "   cores per GPU from that: " + ", ".join(f"at {k}x real time {v:.1f}" for k, v in s["cores_per_gpu"].items()),
        f"limit: PyAV decoding alone, in process, same files: 1 CPU s per {s['pyav_alone_x']:.0f} audio s ("
        + ", ".join(f"{c} {v['x']:.0f}" for c, v in results["pyav_alone"].items())
        + ")",
        f"stages in process, same code, same files ({results['stages']['audio_s']:.0f} audio s, 1 thread): "
        f"together 1 CPU s per {s['in_process_x']:.0f} audio s",
        f"   {'stage':<10} {'audio s per CPU s':>18} {'share':>7}",
    ]
    for stage in STAGES:
        x = s["stage_x"].get(stage)
        lines.append(f"   {stage:<10} {f'{x:.0f}' if x else '-':>18} {100 * s['stage_share'][stage]:>6.1f}%")
    lines += [
        f"   outside the stages (Ray, processes, the driver): {100 * s['outside_stages_share']:.0f}% of the job's "
        "marginal CPU time",
        "load average at the end: " + " ".join(f"{x:.2f}" for x in results["load_average_end"]),
        json.dumps({"bench": "cpu-cost", **results}, sort_keys=True),
    ]
    return "\n".join(lines)


SIZES = {  # (long recording s, long recordings, clips, clip seconds) per codec; small: clips only
    "full": ((1200.0, 1, 60, (5.0, 15.0)), (0.0, 0, 4, (5.0, 15.0))),
    "tiny": ((40.0, 1, 3, (2.0, 4.0)), (0.0, 0, 1, (2.0, 4.0))),
}


def run_bench(size: str, cache: Path, work_dir: str | None, timeout_s: float, segmentation: str = "auto") -> dict:
    from granite_batch.testing.tiny_model import write_tiny_model

    (long_s, longs, clips, clip_s), (_, _, small_clips, _) = SIZES[size]
    files = make_audio(cache / size, long_s, longs, clips, clip_s)
    large = [entry for entries in files.values() for entry in entries]
    small = [entry for entries in files.values() for entry in entries[longs : longs + small_clips]]
    results = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "size": size,
        "segmentation": segmentation,
        "load_average_start": list(os.getloadavg()),
    }
    with tempfile.TemporaryDirectory(prefix="granite-cpu-bench-", dir=work_dir) as tmp:
        work = Path(tmp)
        model_dir = write_tiny_model(work / "tiny-ctc", model_type="granite_speech5_ctc")
        for name, entries in (("small", small), ("large", large)):
            manifest = work / f"{name}.jsonl"
            audio_s = write_manifest(manifest, entries)
            results[name] = {
                "audio_s": audio_s,
                **run_job(manifest, work / name, model_dir, name, timeout_s, segmentation),
            }
            if results[name]["rows"] != len(entries):
                raise RuntimeError(f"{name}: {results[name]['rows']} rows written of {len(entries)}")
        results["pyav_alone"] = pyav_alone(files)
        results["stages"] = stage_costs(large, model_dir, work, segmentation)
    results["load_average_end"] = list(os.getloadavg())
    results["summary"] = summarise(results["large"], results["small"], results["stages"], results["pyav_alone"])
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="toy sizes (a test of the arithmetic, not a figure)")
    parser.add_argument("--cache-dir", default=os.path.join(tempfile.gettempdir(), "granite-cpu-bench-audio"))
    parser.add_argument("--work-dir", help="folder for temporary files (default: the system's)")
    parser.add_argument("--timeout-s", type=float, default=3600.0, help="limit for each job run")
    parser.add_argument(
        "--segmentation",
        choices=["auto", "vad", "energy"],
        default="auto",
        help="the job's segmentation: auto (TurboCTC: no VAD) or vad (as for the LLM models)",
    )
    args = parser.parse_args(argv)
    size = "tiny" if args.tiny else "full"
    results = run_bench(size, Path(args.cache_dir), args.work_dir, args.timeout_s, args.segmentation)
    print(report(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
