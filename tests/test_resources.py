"""Resources that fit: model pools sized for the cluster the job runs on, decode tasks always left
room, and a plan that cannot fit refused before any work instead of waiting forever."""

from __future__ import annotations

import pytest

from conftest import SAMPLES, run_cli, write_jsonl
from granite_batch.config import load_config
from granite_batch.models.hub import ModelRef
from granite_batch.pipeline import JobModel, ResourcesDoNotFit, plan_pools


def job(models: list[dict], **fields):
    config = load_config(overrides={"manifest": "m.jsonl", "output": "out", "models": models, **fields})
    return config, [JobModel(spec, ModelRef(spec.model, None), None) for spec in config.model_specs()]


def test_two_models_on_two_cores_share_what_decoding_leaves():
    config, models = job([{"model": "ctc"}, {"model": "llm"}])
    pools = plan_pools(config, models, {"CPU": 2.0})
    assert [(p.cpus_per_actor, p.gpus_per_actor, p.actors_min, p.actors_max) for p in pools] == [(0.5, 0, 1, 1)] * 2
    assert sum(p.cpus_per_actor for p in pools) + 1.0 <= 2.0  # a CPU for the planning and decode tasks


def test_one_model_keeps_a_whole_cpu_and_gpu_pools_grow_to_the_gpus_present():
    config, models = job([{"model": "llm"}])
    assert plan_pools(config, models, {"CPU": 2.0})[0].cpus_per_actor == 1.0
    (pool,) = plan_pools(config, models, {"CPU": 96.0, "GPU": 8.0})
    assert (pool.gpus_per_actor, pool.cpus_per_actor, pool.actors_min, pool.actors_max) == (1.0, 1.0, 1, 8)


def test_routed_models_share_the_gpus():
    config, models = job([{"model": "ctc"}, {"model": "llm"}])
    one_gpu = plan_pools(config, models, {"CPU": 12.0, "GPU": 1.0})
    assert [(p.gpus_per_actor, p.actors_max) for p in one_gpu] == [(0.5, 1), (0.5, 1)]
    eight = plan_pools(config, models, {"CPU": 96.0, "GPU": 8.0})
    assert [(p.gpus_per_actor, p.actors_max) for p in eight] == [(1.0, 4), (1.0, 4)]


def test_what_the_config_sets_is_kept():
    config, models = job([{"model": "a", "resources": {"gpus_per_actor": 0.25, "model_actors_max": 3}}])
    (pool,) = plan_pools(config, models, {"CPU": 8.0, "GPU": 1.0})
    assert (pool.gpus_per_actor, pool.actors_max) == (0.25, 3)


@pytest.mark.parametrize(
    "models, cluster, named",
    [
        (
            [
                {"model": "a", "resources": {"cpus_per_actor": 1.0}},
                {"model": "b", "resources": {"cpus_per_actor": 1.0}},
            ],
            {"CPU": 2.0},
            "3 CPU",
        ),
        ([{"model": "a", "resources": {"gpus_per_actor": 1.0}}], {"CPU": 8.0}, "1 GPU"),
        ([{"model": "a", "resources": {"actor_resources": {"speech_gpu": 1}}}], {"CPU": 8.0}, "'speech_gpu'"),
        ([{"model": "a", "resources": {"accelerator_type": "H200"}}], {"CPU": 8.0}, "accelerator_type H200"),
    ],
    ids=["cpu", "gpu", "custom", "accelerator"],
)
def test_a_plan_that_cannot_fit_is_refused_naming_what_is_missing(models, cluster, named):
    config, job_models = job(models)
    with pytest.raises(ResourcesDoNotFit, match=named):
        plan_pools(config, job_models, cluster)
    config, job_models = job(models, resources={"wait_for_autoscaler": True})
    assert plan_pools(config, job_models, cluster)  # nodes that join on demand: started all the same


def test_a_two_model_job_with_default_resources_runs_on_two_cores(tmp_path, tiny_ctc_dir, tiny_model_dir):
    rows = [
        {"id": "en", "audio": str(SAMPLES / "en_weather.flac")},
        {"id": "fr", "audio": str(SAMPLES / "fr_gare.mp3"), "language": "fr"},
    ]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    args = [
        "run",
        "--manifest",
        str(manifest),
        "--output",
        str(tmp_path / "out"),
        "--model",
        str(tiny_ctc_dir),
        "--model",
        str(tiny_model_dir),
        "--max-new-tokens",
        "4",
        "--no-progress",
    ]
    result = run_cli(args, timeout=600)  # hung forever before: two pools of 1 CPU left decoding none
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 ok, 0 failed" in result.stdout


def test_a_job_that_cannot_fit_stops_at_once_with_exit_2_and_leaves_nothing(tmp_path, tiny_model_dir):
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"id": "en", "audio": str(SAMPLES / "en_weather.flac")}])
    (tmp_path / "job.yaml").write_text("resources:\n  cpus_per_actor: 4\n")
    output = tmp_path / "out"
    result = run_cli(
        [
            "run",
            "--config",
            str(tmp_path / "job.yaml"),
            "--manifest",
            str(manifest),
            "--output",
            str(output),
            "--model",
            str(tiny_model_dir),
            "--no-progress",
        ],
        timeout=300,
    )
    assert result.returncode == 2, result.stderr[-3000:]
    assert "does not fit this Ray cluster" in result.stderr and "5 CPU" in result.stderr
    assert not output.exists() or not any((output / name).exists() for name in ("transcripts", "_staging", "runs"))
