"""Every file under cluster/ validates offline against the schema of the tool that reads it, and every
node it starts can write the model cache.

- Kubernetes objects: `kubernetes-validate`'s strict schemas (an unknown field fails), the newest
  Kubernetes version the pinned package ships.
- KubeRay `RayJob` / `RayCluster`: the KubeRay v1.7.0 CRD schemas vendored in tests/data/kuberay, made
  strict the way the API server's strict field validation is; their `metadata` and every pod template in
  them also against the core/v1 schemas above.
- cluster-launcher.yaml: the `ray-schema.json` inside the ray wheel, through ray's own
  `prepare_config` + `validate_config` (what `ray up` runs before it calls the cloud), and each
  node_config against botocore's EC2 RunInstances input shape (what the AWS node provider sends).
- The model cache: every container that gets an `HF_HOME` (from the image, the runtime env or its own
  env) has it on a writable volume or under /home/ray. Ray's images run as uid 1000 (`ray`), so a path
  such as /mnt/... that belongs to root cannot be created and the model never loads.
"""

from __future__ import annotations

import copy
import functools
import importlib.resources
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import PurePosixPath

import botocore.session
import jsonschema
import kubernetes_validate
import pytest
import yaml
from botocore.validate import ParamValidator
from ray.autoscaler._private.aws.config import DEFAULT_AMI, _check_ami
from ray.autoscaler._private.util import prepare_config, validate_config
from referencing import Registry, Resource

from conftest import REPO
from granite_batch import __version__

CLUSTER = REPO / "cluster"
KUBERAY = REPO / "tests" / "data" / "kuberay"
K8S_VERSION = kubernetes_validate.utils.latest_version()  # the newest the pinned package ships
IMAGE = f"ghcr.io/my-org/granite-batch:{__version__}"
RAY_HOME = PurePosixPath("/home/ray")  # the home of uid 1000 in rayproject/ray images
CRD_SCHEMAS = {"RayJob": "rayjob-v1.schema.json", "RayCluster": "raycluster-v1.schema.json"}
# The Deep Learning Base OSS Nvidia Driver GPU AMI through its public SSM parameter, or a pinned id.
GPU_AMI = re.compile(
    r"resolve:ssm:/aws/service/deeplearning/ami/x86_64/"
    r"base-oss-nvidia-driver-gpu-ubuntu-2[24]\.04/latest/ami-id|ami-[0-9a-f]{17}"
)


def k8s_objects() -> list[tuple[str, dict]]:
    """Every YAML document under cluster/ that is a Kubernetes object, with the file it is in."""
    found = []
    for path in sorted(CLUSTER.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            if isinstance(document, dict) and "apiVersion" in document and "kind" in document:
                found.append((path.name, document))
    return found


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(instruction, arguments) of cluster/Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", (CLUSTER / "Dockerfile").read_text())
    lines = [line.strip() for line in text.splitlines()]
    return [tuple((line.split(None, 1) + [""])[:2]) for line in lines if line and not line.startswith("#")]


def image_env() -> dict[str, str]:
    """The environment the Dockerfile's ENV instructions give every container of the image."""
    env: dict[str, str] = {}
    for instruction, arguments in dockerfile_instructions():
        if instruction.upper() == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(arguments))
    return env


def runtime_env_vars() -> dict[str, str]:
    """What `ray job submit --runtime-env cluster/runtime_env.yaml` sets in every worker of the job."""
    return yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text()).get("env_vars", {})


def pod_templates(obj: dict) -> Iterator[tuple[str, dict, bool]]:
    """(where, pod template, runs a Ray node) for every pod template in one Kubernetes object."""
    spec = obj["spec"]
    if obj["kind"] == "CronJob":
        yield "spec.jobTemplate.spec.template", spec["jobTemplate"]["spec"]["template"], False
    elif obj["kind"] == "Job":
        yield "spec.template", spec["template"], False
    elif obj["kind"] in ("RayJob", "RayCluster"):
        prefix, cluster = ("spec.rayClusterSpec", spec["rayClusterSpec"]) if obj["kind"] == "RayJob" else ("spec", spec)
        yield f"{prefix}.headGroupSpec.template", cluster["headGroupSpec"]["template"], True
        for i, group in enumerate(cluster.get("workerGroupSpecs", [])):
            yield f"{prefix}.workerGroupSpecs[{i}] ({group['groupName']}).template", group["template"], True
        if "submitterPodTemplate" in spec:
            yield "spec.submitterPodTemplate", spec["submitterPodTemplate"], False


@functools.cache
def core_definitions() -> Registry:
    """kubernetes-validate's strict core definitions, for resolving `$ref`s into them."""
    directory = (
        importlib.resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{K8S_VERSION}-local-strict"
    )
    return Resource.from_contents(json.loads((directory / "_definitions.json").read_text())) @ Registry()


@functools.cache
def core_validator(definition: str) -> jsonschema.Validator:
    """A strict validator for one core definition, e.g. io.k8s.api.core.v1.PodTemplateSpec."""
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$ref": f"https://kubernetes.io/api/_definitions.json#/$defs/{definition}",
    }
    return jsonschema.Draft202012Validator(schema, registry=core_definitions())


def strict_structural(schema):
    """A CRD's structural schema as JSON Schema with the API server's strict field validation: an
    object that does not say `x-kubernetes-preserve-unknown-fields` accepts only the fields it lists
    (kubectl's default `--validate=strict` rejects any other); `nullable` admits null."""
    if isinstance(schema, list):
        return [strict_structural(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: strict_structural(value) for key, value in schema.items()}
    if (
        out.get("type") == "object"
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    return out


@functools.cache
def crd_validator(kind: str) -> jsonschema.Validator:
    schema = json.loads((KUBERAY / CRD_SCHEMAS[kind]).read_text())
    schema.pop("$comment")
    schema = strict_structural(schema)
    # ObjectMeta is the API server's to check, not the CRD's ({"type": "object"} there): checked below.
    schema["properties"]["metadata"] = {"type": "object"}
    return jsonschema.Draft202012Validator(schema)


def schema_problems(obj: dict) -> list[str]:
    """Every way one Kubernetes object breaks its schema (empty when it validates)."""
    kind = obj["kind"]
    if kind not in CRD_SCHEMAS:
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as error:
            return [f"{kind}: {'.'.join(map(str, error.path))}: {error.message}"]
        return []
    errors = [
        f"{kind} (KubeRay v1.7.0 CRD): {error.json_path}: {error.message}"
        for error in crd_validator(kind).iter_errors(obj)
    ]
    errors += [
        f"{kind}.metadata: {error.json_path}: {error.message}"
        for error in core_validator("io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta").iter_errors(
            obj.get("metadata", {})
        )
    ]
    for where, template, _ in pod_templates(obj):
        errors += [
            f"{kind}.{where} (core/v1 PodTemplateSpec, Kubernetes {K8S_VERSION}): {error.json_path}: {error.message}"
            for error in core_validator("io.k8s.api.core.v1.PodTemplateSpec").iter_errors(template)
        ]
    return errors


def under_ray_home(path: str) -> bool:
    pure = PurePosixPath(path)
    return pure.is_absolute() and ".." not in pure.parts and RAY_HOME in pure.parents


def mount_for(path: str, mounts: list[tuple[str, dict]]) -> tuple[str, dict] | None:
    """The mount a path lives on: the one at the path or the nearest directory above it."""
    pure = PurePosixPath(path)
    covering = [(at, m) for at, m in mounts if PurePosixPath(at) == pure or PurePosixPath(at) in pure.parents]
    return max(covering, key=lambda item: len(PurePosixPath(item[0]).parts), default=None)


def writable_by_ray(volume: dict, pod_spec: dict) -> bool:
    """Whether uid 1000 can write a volume whatever the node: an emptyDir (Kubernetes makes it
    world-writable), or a claim when the pod sets fsGroup (Kubernetes gives the group the volume). A
    hostPath is as the host has it (created root-owned), and configMap, secret etc. are read-only."""
    if "emptyDir" in volume:
        return True
    claim = {"ephemeral", "persistentVolumeClaim"} & set(volume)
    return bool(claim) and pod_spec.get("securityContext", {}).get("fsGroup") is not None


def pod_cache_problems(where: str, template: dict, runs_ray: bool, job_home: str | None) -> list[str]:
    """Why a pod's containers could not write their HF_HOME, or (Ray nodes) would download per pod
    restart rather than once per node: a Ray node's cache must be the pod's emptyDir volume.
    `job_home` is the HF_HOME the job's runtime env gives every Ray worker."""
    spec = template["spec"]
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    problems = []
    for container in spec.get("initContainers", []) + spec["containers"]:
        env = {item["name"]: item.get("value") for item in container.get("env", [])}
        homes = set()
        if "HF_HOME" in env:
            homes.add(env["HF_HOME"])
        elif container["image"] == IMAGE and "HF_HOME" in image_env():
            homes.add(image_env()["HF_HOME"])
        if runs_ray and job_home:
            homes.add(job_home)
        mounts = [(m["mountPath"], m) for m in container.get("volumeMounts", [])]
        for home in sorted(homes):
            name = f"{where}: container {container['name']}: HF_HOME={home}"
            found = mount_for(home, mounts)
            volume = volumes.get(found[1]["name"], {}) if found else {}
            if found and found[1].get("readOnly"):
                problems.append(f"{name} is on a read-only mount")
            elif found and not writable_by_ray(volume, spec):
                problems.append(f"{name} is on volume {found[1]['name']!r}, which uid 1000 may not be able to write")
            elif not found and not under_ray_home(home):
                problems.append(
                    f"{name} is neither on a writable volume nor under {RAY_HOME} "
                    f"(the image runs as uid 1000, which cannot create it)"
                )
            if runs_ray and "emptyDir" not in volume:
                problems.append(f"{name}: a Ray node's model cache must be an emptyDir volume of the pod")
    return problems


def docker_options(launcher: dict) -> list[tuple[str, list[str]]]:
    """(node type, its `docker run` options): the shared ones plus the head's or the type's own."""
    docker = launcher.get("docker", {})
    shared = docker.get("run_options", [])
    options = []
    for name, node_type in launcher["available_node_types"].items():
        own = (
            docker.get("head_run_options", [])
            if name == launcher["head_node_type"]
            else docker.get("worker_run_options", []) + node_type.get("docker", {}).get("worker_run_options", [])
        )
        options.append((name, shlex.split(" ".join(shared + own))))  # ray joins them into one line
    return options


def launcher_cache_problems(launcher: dict, job_home: str | None) -> list[str]:
    """Why a launcher node's container could not write HF_HOME, or would lose the cache when
    `ray up` recreates the container: it must be a named Docker volume. `job_home` as above."""
    problems = []
    image = launcher.get("docker", {}).get("image")
    for node_type, argv in docker_options(launcher):
        argv = [
            part
            for token in argv  # `--env=A=B` as `--env A=B`
            for part in (token.split("=", 1) if token.startswith("--") and "=" in token else [token])
        ]
        env: dict[str, str] = {}
        mounts: list[tuple[str, dict]] = []
        for flag, value in zip(argv, argv[1:] + [""]):
            if flag in ("-e", "--env") and value.startswith("HF_HOME="):
                env["HF_HOME"] = value.split("=", 1)[1]
            elif flag in ("-v", "--volume"):
                source, target, *mode = value.split(":")
                mounts.append((target, {"source": source, "readOnly": "ro" in ",".join(mode).split(",")}))
            elif flag == "--mount":
                fields = dict(part.split("=", 1) if "=" in part else (part, "true") for part in value.split(","))
                target = fields.get("target") or fields.get("dst") or fields.get("destination")
                mounts.append(
                    (
                        target,
                        {
                            "source": fields.get("source") or fields.get("src", ""),
                            "readOnly": fields.get("readonly", fields.get("ro")) in ("true", "1"),
                        },
                    )
                )
        homes = {env.get("HF_HOME") or (image_env().get("HF_HOME") if image == IMAGE else None), job_home} - {None}
        for home in sorted(homes):
            found = mount_for(home, mounts)
            if found and found[1]["readOnly"]:
                problems.append(f"launcher {node_type}: HF_HOME={home} is on a read-only mount")
            elif not found and not under_ray_home(home):
                problems.append(f"launcher {node_type}: HF_HOME={home} is neither on a volume nor under {RAY_HOME}")
            if not found or found[1]["source"].startswith(("/", "~", ".")) or not found[1]["source"]:
                problems.append(
                    f"launcher {node_type}: HF_HOME={home} must be on a named Docker volume (a host "
                    f"directory that Docker creates belongs to root; a named one is kept)"
                )
    return problems


def test_the_objects_found_are_the_manifests():
    assert sorted((name, obj["kind"]) for name, obj in k8s_objects()) == [
        ("cronjob.yaml", "CronJob"),
        ("raycluster.yaml", "RayCluster"),
        ("rayjob.yaml", "RayJob"),
    ]
    assert K8S_VERSION == "1.37.0"  # the newest kubernetes-validate 1.37.0 ships; moves with the pin


@pytest.mark.parametrize("name, obj", k8s_objects(), ids=lambda value: value if isinstance(value, str) else "")
def test_kubernetes_object_validates_strictly(name, obj):
    assert schema_problems(obj) == []


@pytest.mark.parametrize(
    "kind, path",
    [
        ("CronJob", ["spec", "jobTemplate", "spec", "template", "spec", "containers", 0]),
        ("RayJob", ["spec"]),
        ("RayJob", ["spec", "rayClusterSpec", "workerGroupSpecs", 1]),
        ("RayJob", ["spec", "rayClusterSpec", "headGroupSpec", "template", "spec", "containers", 0]),
        ("RayCluster", ["spec", "workerGroupSpecs", 0, "template", "spec"]),
    ],
)
def test_an_unknown_field_fails(kind, path):
    """The checks are strict: a misspelt field anywhere (here `imagePullPolicyy`) is an error."""
    obj = copy.deepcopy(next(obj for _, obj in k8s_objects() if obj["kind"] == kind))
    node = obj
    for key in path:
        node = node[key]
    node["imagePullPolicyy"] = "Always"
    problems = schema_problems(obj)
    assert problems and all("imagePullPolicyy" in problem for problem in problems), problems


def test_cluster_launcher_validates_against_the_schema_in_the_ray_wheel():
    launcher = yaml.safe_load((CLUSTER / "cluster-launcher.yaml").read_text())
    schema_path = importlib.resources.files("ray.autoscaler") / "ray-schema.json"
    jsonschema.validate(launcher, json.loads(schema_path.read_text()))  # the file as written
    validate_config(prepare_config(copy.deepcopy(launcher)))  # with the defaults `ray up` fills in
    run_instances = botocore.session.get_session().get_service_model("ec2").operation_model("RunInstances").input_shape
    for name, node_type in launcher["available_node_types"].items():
        report = ParamValidator().validate(dict(node_type["node_config"], MinCount=1, MaxCount=1), run_instances)
        assert not report.has_errors(), f"{name}: {report.generate_report()}"


def test_cluster_launcher_names_a_current_gpu_ami():
    """`latest_dlami` makes ray substitute its CUDA 11.2 / Ubuntu 18.04 default; ours is left alone."""
    launcher = yaml.safe_load((CLUSTER / "cluster-launcher.yaml").read_text())
    checked = copy.deepcopy(launcher)
    _check_ami(checked)  # the step of `ray up` that replaces a missing ImageId or `latest_dlami`
    for name, node_type in checked["available_node_types"].items():
        image = node_type["node_config"]["ImageId"]
        assert image == launcher["available_node_types"][name]["node_config"]["ImageId"], name
        assert image not in DEFAULT_AMI.values() and GPU_AMI.fullmatch(image), (name, image)


def test_every_pod_can_write_its_model_cache():
    problems = [
        problem
        for _, obj in k8s_objects()
        for where, template, runs_ray in pod_templates(obj)
        for problem in pod_cache_problems(
            f"{obj['kind']} {where}", template, runs_ray, runtime_env_vars().get("HF_HOME")
        )
    ]
    assert problems == []


def test_every_launcher_node_can_write_its_model_cache():
    launcher = yaml.safe_load((CLUSTER / "cluster-launcher.yaml").read_text())
    assert launcher_cache_problems(launcher, runtime_env_vars().get("HF_HOME")) == []


def test_the_cache_check_refuses_what_uid_1000_cannot_write():
    """The check itself: a root-owned path, a read-only mount, a config map, a Ray node without its
    volume and a launcher bind mount fail; a volume, or a path under /home/ray off Ray, passes."""

    def pod(home, mounts=(), volumes=()):
        return {
            "spec": {
                "containers": [
                    {
                        "name": "c",
                        "image": "other",
                        "env": [{"name": "HF_HOME", "value": home}],
                        "volumeMounts": list(mounts),
                    }
                ],
                "volumes": list(volumes),
            }
        }

    cache = {"name": "cache", "emptyDir": {}}
    assert pod_cache_problems("p", pod("/mnt/cache/huggingface"), False, None)
    assert pod_cache_problems(
        "p",
        pod("/mnt/cache/hf", [{"name": "cache", "mountPath": "/mnt/cache", "readOnly": True}], [cache]),
        False,
        None,
    )
    assert pod_cache_problems(
        "p",
        pod(
            "/mnt/cache/hf", [{"name": "cfg", "mountPath": "/mnt/cache"}], [{"name": "cfg", "configMap": {"name": "x"}}]
        ),
        False,
        None,
    )
    host = {"name": "cache", "hostPath": {"path": "/var/cache/hf", "type": "DirectoryOrCreate"}}
    assert pod_cache_problems(
        "p", pod("/mnt/cache/hf", [{"name": "cache", "mountPath": "/mnt/cache"}], [host]), False, None
    )
    claim = {"name": "cache", "ephemeral": {"volumeClaimTemplate": {"spec": {}}}}
    claimed = pod("/mnt/cache/hf", [{"name": "cache", "mountPath": "/mnt/cache"}], [claim])
    assert pod_cache_problems("p", claimed, False, None)
    claimed["spec"]["securityContext"] = {"fsGroup": 100}
    assert not pod_cache_problems("p", claimed, False, None)
    assert pod_cache_problems("p", pod("/home/ray/../../mnt/hf"), False, None)
    assert pod_cache_problems("p", pod("/home/ray/.cache/hf"), True, None)  # a Ray node without its volume
    assert pod_cache_problems(
        "p",
        pod("/home/ray/.cache/hf", [{"name": "cache", "mountPath": "/home/ray/.cache/hf"}], [cache]),
        True,
        "/mnt/hf",
    )  # the runtime env's path counts on Ray nodes
    assert not pod_cache_problems("p", pod("/home/ray/.cache/hf"), False, "/mnt/hf")
    assert not pod_cache_problems(
        "p", pod("/mnt/cache/hf", [{"name": "cache", "mountPath": "/mnt/cache"}], [cache]), True, None
    )
    docker = {"image": "other", "run_options": ["-e HF_HOME=/mnt/hf"]}
    launcher = {"docker": docker, "head_node_type": "h", "available_node_types": {"h": {}}}
    assert launcher_cache_problems(launcher, None)
    docker["run_options"] = ["-e HF_HOME=/mnt/hf", "-v /data/hf:/mnt/hf"]  # a host directory: root's
    assert launcher_cache_problems(launcher, None)
    docker["run_options"] = ["-e HF_HOME=/mnt/hf", "-v hf:/mnt/hf:ro"]
    assert launcher_cache_problems(launcher, None)
    docker["run_options"] = ["-e HF_HOME=/mnt/hf", "--mount type=volume,src=hf,dst=/mnt"]
    assert launcher_cache_problems(launcher, None) == []
    docker["run_options"] = ["--env=HF_HOME=/mnt/hf", "--volume=hf:/mnt/hf"]
    assert launcher_cache_problems(launcher, None) == []
    assert launcher_cache_problems(launcher, "/srv/hf")


def test_hf_home_is_one_path_everywhere():
    """The image, the runtime env, the manifests and the launcher all point the cache at one place."""
    homes = {"Dockerfile": image_env().get("HF_HOME"), "runtime_env.yaml": runtime_env_vars().get("HF_HOME")}
    for name, obj in k8s_objects():
        for where, template, _ in pod_templates(obj):
            for container in template["spec"]["containers"]:
                for item in container.get("env", []):
                    if item["name"] == "HF_HOME":
                        homes[f"{name} {where} {container['name']}"] = item.get("value")
    for node_type, argv in docker_options(yaml.safe_load((CLUSTER / "cluster-launcher.yaml").read_text())):
        for flag, value in zip(argv, argv[1:]):
            if flag in ("-e", "--env") and value.startswith("HF_HOME="):
                homes[f"cluster-launcher.yaml {node_type}"] = value.split("=", 1)[1]
    assert len(set(homes.values())) == 1 and None not in homes.values(), homes


def test_the_image_creates_the_cache_as_the_ray_user():
    """So that a new Docker volume mounted there starts out owned by uid 1000 (Docker copies the
    image directory's owner and mode into an empty volume), and the path exists without one."""
    user, env, created = "root", {}, []
    for instruction, arguments in dockerfile_instructions():
        if instruction.upper() == "USER":
            user = arguments.strip()
        elif instruction.upper() == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(arguments))
        elif instruction.upper() == "RUN" and "mkdir" in arguments:
            expanded = re.sub(r"\$\{?(\w+)\}?", lambda m: env.get(m.group(1), m.group(0)), arguments)
            created += [(user, path) for path in shlex.split(expanded) if path.startswith("/")]
    assert ("ray", image_env()["HF_HOME"]) in created, created
