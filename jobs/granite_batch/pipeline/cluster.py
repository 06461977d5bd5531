"""Ray itself and what the job asks of it: starting and stopping Ray, the model pools planned to fit the
cluster (refused before any work when they cannot), the retries each stage gets, and the job's Ray metrics."""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from dataclasses import dataclass

from granite_batch.config import ConfigError, JobConfig, ModelSpec
from granite_batch.models.hub import ModelRef
from granite_batch.models.profiles import ModelProfile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobModel:
    """One model of the job, resolved once on the driver (run/transcription.py): the entry that named
    it, the exact revision its rows are labelled with and loaded from, and its profile."""

    spec: ModelSpec
    ref: ModelRef
    profile: ModelProfile


class ResourcesDoNotFit(ConfigError):
    """The job's model pools and the decoding they need cannot fit the cluster it runs on."""


@dataclass(frozen=True)
class Pool:
    """What one model's actor pool asks of Ray."""

    cpus_per_actor: float
    gpus_per_actor: float
    actors_min: int
    actors_max: int
    accelerator_type: str | None
    custom: dict[str, float]


def plan_pools(config: JobConfig, models: list[JobModel], cluster: dict[str, float]) -> list[Pool]:
    """Each model's pool, sized for `cluster` (ray.cluster_resources()) where the config leaves it open:
    the job's models share the GPUs there are (a fraction each when fewer than models), pools grow to
    the GPUs present, and without GPUs the model actors share the CPUs the decode tasks leave.
    Raises ResourcesDoNotFit, naming what is missing, when the pools at their smallest and the CPU
    stages' tasks cannot run at once (unless `resources.wait_for_autoscaler`)."""
    n = len(models)
    cpus, gpus = cluster.get("CPU", 0.0), cluster.get("GPU", 0.0)
    # What the CPU stages need free beside the model actors: the planning tasks (Ray's read and
    # repartition tasks) ask for a whole CPU, the decode tasks for decode_cpus.
    stage_cpus = max(1.0, config.resources.decode_cpus)
    pools = []
    for model in models:
        asked = config.resources_for(model.spec)
        gpu = asked.gpus_per_actor
        if gpu is None:
            gpu = min(1.0, gpus / n) if gpus > 0 else 0.0
        cpu = asked.cpus_per_actor
        if cpu is None:
            # Without GPUs the model runs on CPUs: leave the decode tasks theirs, or the job waits forever.
            cpu = 1.0 if gpu > 0 else max(0.25, min(1.0, (cpus - stage_cpus) / n))
        most = asked.model_actors_max
        if most is None:
            most = max(asked.model_actors_min, int(gpus / n / gpu + 1e-9)) if gpu > 0 else asked.model_actors_min
        pools.append(Pool(cpu, gpu, asked.model_actors_min, most, asked.accelerator_type, dict(asked.actor_resources)))
    if not config.resources.wait_for_autoscaler:
        _check_fit(models, pools, cluster, stage_cpus)
    return pools


def _check_fit(models: list[JobModel], pools: list[Pool], cluster: dict[str, float], stage_cpus: float) -> None:
    names = [model.spec.model for model in models]
    missing = []
    need_cpu = sum(p.actors_min * p.cpus_per_actor for p in pools) + stage_cpus
    if need_cpu > cluster.get("CPU", 0.0) + 1e-9:
        each = ", ".join(f"{name}: {p.actors_min} x {p.cpus_per_actor:g}" for name, p in zip(names, pools))
        missing.append(
            f"{need_cpu:g} CPU (model actors {each}, and {stage_cpus:g} for the planning and decode tasks) "
            f"where the cluster has {cluster.get('CPU', 0.0):g}: lower resources.cpus_per_actor or leave it "
            "unset to share what there is"
        )
    need_gpu = sum(p.actors_min * p.gpus_per_actor for p in pools)
    if need_gpu > cluster.get("GPU", 0.0) + 1e-9:
        missing.append(
            f"{need_gpu:g} GPU where the cluster has {cluster.get('GPU', 0.0):g}: lower resources.gpus_per_actor "
            "(0.5 lets two models share a GPU) or model_actors_min"
        )
    for name, pool in zip(names, pools):
        if pool.accelerator_type and f"accelerator_type:{pool.accelerator_type}" not in cluster:
            missing.append(f"accelerator_type {pool.accelerator_type} for {name}: no node of the cluster has it")
        for resource, amount in pool.custom.items():
            if pool.actors_min * amount > cluster.get(resource, 0.0) + 1e-9:
                missing.append(
                    f"{pool.actors_min * amount:g} of resource {resource!r} for {name}; the cluster has "
                    f"{cluster.get(resource, 0.0):g}"
                )
    if missing:
        raise ResourcesDoNotFit(
            "the job does not fit this Ray cluster, so nothing was started: it needs "
            + "; and ".join(missing)
            + " (resources.wait_for_autoscaler: true starts anyway where nodes join on demand)"
        )


def waiting_for() -> str:
    """What the cluster has free, for a run that makes no progress."""
    import ray

    free, total = ray.available_resources(), ray.cluster_resources()
    shown = [key for key in ("CPU", "GPU") if key in total] + sorted(
        key for key in total if not key.startswith(("node:", "memory", "object_store_memory", "CPU", "GPU"))
    )
    return ", ".join(f"{free.get(key, 0.0):g} of {total[key]:g} {key} free" for key in shown)


def ensure_ray():
    import ray

    if not ray.is_initialized():
        handlers = {number: signal.getsignal(number) for number in (signal.SIGINT, signal.SIGTERM)}
        # Connects to RAY_ADDRESS / a running cluster when there is one, else starts a local Ray.
        context = ray.init(logging_level=logging.WARNING, log_to_driver=True)
        if getattr(context, "dashboard_url", None):  # hidden by logging_level=WARNING otherwise
            log.info("Ray dashboard: http://%s", context.dashboard_url.removeprefix("http://"))
        if threading.current_thread() is threading.main_thread():
            # Ray's core worker installs a SIGTERM handler that aborts the driver: the driver's own
            # (a clean stop, cli.py) go back in place.
            for number, handler in handlers.items():
                if callable(handler):
                    signal.signal(number, handler)
    return ray


class JobMetrics:
    """A run's Ray metrics (`ray.util.metrics`, exported by Ray's Prometheus endpoint, tagged with the
    run id): rows written ok and failed, audio seconds and segments, counted as rows are written."""

    def __init__(self, run_id: str):
        from ray.util.metrics import Counter

        keys = ("run_id",)
        self.tags = {"run_id": run_id}
        self.counters = {
            "rows_ok": Counter("granite_batch_rows_ok", "transcript rows written without error", tag_keys=keys),
            "rows_failed": Counter("granite_batch_rows_failed", "transcript rows written with an error", tag_keys=keys),
            "audio_s": Counter("granite_batch_audio_seconds", "seconds of audio in the rows written", tag_keys=keys),
            "segments": Counter("granite_batch_segments", "speech segments in the rows written", tag_keys=keys),
        }

    def record(self, counts: dict[str, float]) -> None:
        """Add a batch's counts (output.summary.batch_counts); Ray's counters take only positive steps."""
        for name, value in counts.items():
            if value > 0:
                self.counters[name].inc(value, tags=self.tags)


def stop_ray(timeout_s: float) -> None:
    """Shut Ray down, waiting at most `timeout_s` (tasks may still be running after an interrupt)."""
    import ray

    def shutdown() -> None:
        try:
            ray.shutdown()
        except Exception:
            log.debug("ray.shutdown failed", exc_info=True)  # exiting anyway: Ray's processes end with us

    stopper = threading.Thread(target=shutdown, daemon=True)
    stopper.start()
    stopper.join(timeout=timeout_s)


# Passed to map_batches for the model actor pool: restart a dead actor, do not retry its batch (the
# driver redoes its rows one by one).
MODEL_ACTOR_RETRIES = {"max_restarts": -1, "max_task_retries": 0}


# Passed to map_batches for the decode and segment tasks: their native work runs in a forked child
# (isolation.py), so a worker that dies anyway (killed, out of memory) is retried once, not forever.
TASK_RETRIES = {"max_retries": 1}

# Ray 2.60's `map_batches` has named parameters for resources but none for these retry options, and
# warns for any extra remote argument (`ray_remote_args` "is deprecated and will be removed in Ray
# 2.64"; `ray_remote_args_fn`, the other way, is deprecated too). Dropping them is not an option: with
# Ray Data's defaults a poison batch is retried forever. Our Ray range (<2.61) cannot reach 2.64
# unnoticed, and tests/test_api.py fails once `map_batches` names them, to switch over.
RETRY_OPTIONS = ("max_restarts", "max_task_retries", "max_retries")


def map_batches_with_retries(ds, fn, retries: dict, **kwargs):
    """`ds.map_batches(fn, **kwargs)` with `retries` (keys of RETRY_OPTIONS) passed as remote
    arguments, without the deprecation warning that only names Ray's missing parameters."""
    unknown = set(retries) - set(RETRY_OPTIONS)
    if unknown:
        raise ValueError(f"not a retry option: {sorted(unknown)}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        return ds.map_batches(fn, **kwargs, **retries)


MAX_LOST_BATCHES = 16
