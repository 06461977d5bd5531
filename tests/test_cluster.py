"""Every file under cluster/ parses, has what its tool requires, and agrees with the code and pins."""

from __future__ import annotations

import re
import shlex

import yaml
from ray.runtime_env import RuntimeEnv

from conftest import REPO
from granite_batch import __version__
from granite_batch.cli import _parser
from granite_batch.config import load_config

CLUSTER = REPO / "cluster"
# The exact versions CI runs (pyproject.toml holds ranges around them).
PINS = dict(re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", (REPO / "constraints.txt").read_text(), re.M))
RAY_VERSION = PINS["ray"]
IMAGE = f"ghcr.io/my-org/granite-batch:{__version__}"


def load(name: str) -> dict:
    return yaml.safe_load((CLUSTER / name).read_text())


def check_cli(argv: list[str]) -> None:
    """The command is our real CLI and its arguments parse; a YAML config it names validates."""
    if argv[:3] == ["python", "-m", "granite_batch.cli"]:
        argv = argv[3:]
    else:
        assert argv[0] == "granite-batch", argv
        argv = argv[1:]
    args = _parser().parse_args(argv)
    assert args.command == "run"
    if args.config:
        in_image = "/home/ray/granite-batch/"
        assert args.config.startswith(in_image), "the config must be the one the Dockerfile copies"
        load_config(REPO / args.config[len(in_image) :])


def containers(pod_template: dict) -> list[dict]:
    return pod_template["spec"]["containers"]


def test_every_yaml_parses():
    files = sorted(CLUSTER.glob("*.yaml"))
    assert {f.name for f in files} >= {
        "job.yaml",
        "runtime_env.yaml",
        "rayjob.yaml",
        "raycluster.yaml",
        "cronjob.yaml",
        "cluster-launcher.yaml",
    }
    for path in files:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path


def test_job_config_validates():
    config = load_config(CLUSTER / "job.yaml")
    assert config.resources.gpus_per_actor == 1
    assert config.resources.model_actors_min < config.resources.model_actors_max  # the GPU pool autoscales


def check_ray_cluster_spec(spec: dict) -> None:
    assert spec["rayVersion"] == RAY_VERSION
    assert spec["enableInTreeAutoscaling"] is True
    head = containers(spec["headGroupSpec"]["template"])
    assert head[0]["image"] == IMAGE
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"cpu-decode", "gpu-model"}
    for group in groups.values():
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        for container in containers(group["template"]):
            assert container["image"] == IMAGE
            assert container["resources"]["requests"] == container["resources"]["limits"]
    gpu = containers(groups["gpu-model"]["template"])[0]["resources"]["limits"]
    assert gpu["nvidia.com/gpu"] == "1"
    assert "nvidia.com/gpu" not in containers(groups["cpu-decode"]["template"])[0]["resources"]["limits"]
    assert groups["gpu-model"]["maxReplicas"] >= load_config(CLUSTER / "job.yaml").resources.model_actors_max


def test_rayjob():
    job = load("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    check_cli(shlex.split(job["spec"]["entrypoint"]))
    check_ray_cluster_spec(job["spec"]["rayClusterSpec"])


def test_raycluster():
    cluster = load("raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    check_ray_cluster_spec(cluster["spec"])
    ports = {p["containerPort"] for p in containers(cluster["spec"]["headGroupSpec"]["template"])[0]["ports"]}
    assert 8265 in ports  # job submission and dashboard


def test_cronjob_submits_to_the_raycluster():
    cron = load("cronjob.yaml")
    assert cron["apiVersion"] == "batch/v1" and cron["kind"] == "CronJob"
    assert len(cron["spec"]["schedule"].split()) == 5
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    container = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"][0]
    command = container["command"]
    assert command[:3] == ["ray", "job", "submit"] and container["image"] == IMAGE
    address = command[command.index("--address") + 1]
    assert address == f"http://{load('raycluster.yaml')['metadata']['name']}-head-svc:8265"
    check_cli(command[command.index("--") + 1 :])


def test_cluster_launcher():
    launcher = load("cluster-launcher.yaml")
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type", "max_workers"):
        assert key in launcher
    types = launcher["available_node_types"]
    assert launcher["head_node_type"] in types
    assert sum(t.get("max_workers", 0) for t in types.values()) <= launcher["max_workers"]
    assert launcher["docker"]["image"] == IMAGE


def test_runtime_env_ships_our_package():
    env = load("runtime_env.yaml")
    for module in env["py_modules"]:
        assert (REPO / module / "__init__.py").exists()
    assert all(isinstance(v, str) for v in env["env_vars"].values())  # Ray requires string values
    # Ray's own parser of `--runtime-env`: it checks the types of the fields it knows, and passes any
    # other key on to a plugin, so an unknown key is checked here.
    assert set(env) <= set(RuntimeEnv.known_fields), set(env) - set(RuntimeEnv.known_fields)
    RuntimeEnv(**env)


def test_dockerfile_agrees_with_pyproject():
    text = (CLUSTER / "Dockerfile").read_text()
    base = re.search(r"^FROM (\S+)", text, re.M).group(1)
    assert base == f"rayproject/ray:{RAY_VERSION}-py311-gpu"
    assert f'"torch=={PINS["torch"]}"' in text and f'"torchaudio=={PINS["torchaudio"]}"' in text
    for source in re.findall(r"^COPY (?:--chown=\S+ )?(.+) \S+$", text, re.M):
        for path in source.split():
            assert (REPO / path).exists(), path
