"""The one place that assembles Ray Data graphs.

    manifest rows -> decode (CPU tasks) -> segment (CPU tasks) -> Granite Speech (actor pool)
    transcripts   -> second pass (language model actor pool)
    a transcripts dataset read back as a Ray Dataset (results.to_ray)

Each graph is lazy; the drivers (drivers.py) iterate it and write what comes out. The stages are
plain functions and classes on Arrow tables (audio, segment, transcribe, second_pass); here they
are wrapped in Ray Data's `map_batches` with their resources.
"""

from __future__ import annotations

import logging
import math
import posixpath
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from granite_batch.audio import decode_cut, segment
from granite_batch.audio.isolation import CrashTest
from granite_batch.audio.vad import VadOptions
from granite_batch.config import ConfigError, JobConfig, ModelSpec, SecondPassOptions
from granite_batch.inference.assemble import RecordingRows
from granite_batch.inference.escalation import (
    Cascade,
    cascade_flags,
    escalate_segments,
    escalation_pairs,
    mark_escalations,
    pool_models,
)
from granite_batch.inference.routing import RequestFlags, route_table
from granite_batch.inference.transcribe import transcribe_segments
from granite_batch.inputs.normalise import normalise_rows
from granite_batch.inputs.plan import PlanLayout, plan_bucket
from granite_batch.inputs.rows import Defaults
from granite_batch.models.engines import load_speech_model
from granite_batch.models.hub import ModelRef
from granite_batch.models.profiles import ModelProfile
from granite_batch.models.speculative import SpeculativeOptions
from granite_batch.second_pass.language_model import LanguageModel
from granite_batch.second_pass.prompts import Prompter
from granite_batch.second_pass.stage import second_pass_table

if TYPE_CHECKING:
    from ray.data import Dataset

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


def segment_options(config: JobConfig, profile: ModelProfile) -> VadOptions:
    """How a model's recordings are cut: config `segmentation`, or (auto) the model profile's `vad`."""
    return VadOptions(vad={"vad": True, "energy": False}.get(config.segmentation, profile.vad))


def load_options(config: JobConfig, device: str) -> dict:
    """What the model actor passes to `load_speech_model`, built once from the job's config."""
    segments, audio_s = config.model_batch(gpu=device.startswith("cuda"))
    generation = config.generation
    return {
        "device": device,
        "dtype": config.dtype,
        "trust_remote_code": config.trust_remote_code,
        "max_new_tokens": generation.max_new_tokens,
        "max_new_tokens_per_audio_s": generation.max_new_tokens_per_audio_s,
        "num_beams": generation.num_beams,
        "repetition_penalty": generation.repetition_penalty,
        "max_batch_audio_s": audio_s,
        "max_batch_segments": segments,
        "speculative": SpeculativeOptions(
            generation.decoding,
            generation.ctc_entropy_threshold,
            generation.verify_threshold,
            generation.fallback_beams,
        ),
    }


class Transcriber:
    """Model actor: loads the model once, then maps batches of segment rows to their texts."""

    def __init__(
        self,
        model: JobModel,
        options: dict,
        flags: RequestFlags,
        run_id: str,
        crash_test: CrashTest | None = None,
        cascade: Cascade | None = None,
    ):
        self.model_ref = model.ref
        self.run_id = run_id
        self.flags = flags
        self.crash_test = crash_test
        self.cascade = cascade
        # The exact revision the rows are labelled with is the one loaded.
        self.speech_model = load_speech_model(
            model.ref.name,
            model.ref.revision,
            profile=model.profile,
            engine=model.spec.engine or "transformers",
            **options,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.crash_test is not None:
            self.crash_test.check("model", batch.column("audio").to_pylist())
        table = transcribe_segments(batch, self.speech_model, self.flags)
        n = table.num_rows
        table = table.append_column("model", pa.array([self.model_ref.name] * n, pa.string()))
        table = table.append_column("model_revision", pa.array([self.model_ref.revision] * n, pa.string()))
        table = table.append_column("run_id", pa.array([self.run_id] * n, pa.string()))
        table = table.append_column("segment_model", pa.array([self.model_ref.name] * n, pa.string()))
        cascade = self.cascade
        if cascade is None:
            return table.append_column("escalate_to", pa.nulls(n, pa.int32()))
        return mark_escalations(
            table, batch.column("samples"), cascade.models, cascade.index, cascade.below, cascade.on, self.flags
        )


class Escalator:
    """Model actor of an escalation stage: decodes again the segments an earlier model sent on to it."""

    def __init__(
        self,
        model: JobModel,
        index: int,
        options: dict,
        flags: RequestFlags,
        last: bool,
        crash_test: CrashTest | None = None,
    ):
        self.model_ref = model.ref
        self.index = index
        self.flags = flags
        self.last = last
        self.crash_test = crash_test
        self.speech_model = load_speech_model(
            model.ref.name,
            model.ref.revision,
            profile=model.profile,
            engine=model.spec.engine or "transformers",
            **options,
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.crash_test is not None:
            self.crash_test.check("escalation", batch.column("audio").to_pylist())
        return escalate_segments(batch, self.speech_model, self.index, self.model_ref.name, self.flags, self.last)


def request_flags(config: JobConfig) -> RequestFlags:
    """The job's request settings for rows that leave them unset (routing.py)."""
    # word_timestamps belongs to the word-timings work; read it when the config has it.
    return RequestFlags(config.speakers, config.punctuation, bool(getattr(config, "word_timestamps", False)))


class SecondPassWorker:
    """Language model actor: loads the model once, then maps batches of transcripts to second-pass rows."""

    def __init__(self, options: SecondPassOptions, template_source: str, model_ref: ModelRef, run_id: str, device: str):
        self.options = options
        self.model_ref = model_ref
        self.run_id = run_id
        self.lm = LanguageModel.load(
            options.model,
            options.revision,
            device=device,
            dtype=options.dtype,
            max_new_tokens=options.max_new_tokens,
            batch_size=options.batch_size,
            max_batch_tokens=options.max_batch_tokens,
            context_tokens=options.context_tokens,
        )
        self.prompter = Prompter(self.lm.tokenizer, template_source, options.question)

    def __call__(self, batch: pa.Table) -> pa.Table:
        table = second_pass_table(batch, self.lm, self.prompter)
        n = table.num_rows
        for column, value in [
            ("name", self.options.dataset_name),
            ("model", self.model_ref.name),
            ("model_revision", self.model_ref.revision),
            ("run_id", self.run_id),
        ]:
            table = table.append_column(column, pa.array([value] * n, pa.string()))
        return table


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


# Each input block is one object put by the driver: past this many, blocks grow instead.
MAX_INPUT_BLOCKS = 100_000


def _block_rows(rows: int, cluster: dict, max_rows: int) -> int:
    """Rows per input block: enough blocks to keep every CPU of the cluster busy, at most `max_rows`
    rows each (more for manifests of over `MAX_INPUT_BLOCKS` * `max_rows` rows)."""
    per_cpu = math.ceil(rows / max(2, 2 * int(cluster.get("CPU", 1))))
    return max(1, min(max_rows, per_cpu), math.ceil(rows / MAX_INPUT_BLOCKS))


def _input_blocks(table: pa.Table, cluster: dict, max_rows: int) -> list[pa.Table]:
    """Slices of `table` of `_block_rows` rows each."""
    block_rows = _block_rows(table.num_rows, cluster, max_rows)
    return [table.slice(i, block_rows) for i in range(0, table.num_rows, block_rows)]


def _plan_buckets(buckets: pa.Table, layout: PlanLayout):
    for bucket in buckets.column("id").to_pylist():
        todo, _ = plan_bucket(layout, bucket)
        if todo.num_rows:
            yield todo


def planned_rows(layout: PlanLayout, rows_to_do: int, cluster: dict, max_rows: int):
    """The rows still to do as a lazy Ray Dataset: one task plans each bucket of the plan (plan.py),
    so rows reach the next stage as soon as their bucket is planned, in blocks of `_block_rows`.
    Its tasks ask for a whole CPU (Ray's read and repartition tasks): plan_pools leaves one free."""
    import ray

    ds = ray.data.range(layout.buckets, override_num_blocks=layout.buckets)
    ds = ds.map_batches(_plan_buckets, fn_kwargs={"layout": layout}, batch_size=1, batch_format="pyarrow")
    # Streaming, fused into the planning tasks: a bucket's rows leave them in small blocks.
    return ds.repartition(target_num_rows_per_block=_block_rows(rows_to_do, cluster, max_rows))


# The model actor takes this many generate() calls' worth of segments at a time and sorts them by
# length before cutting them into calls, so each call pads to segments of similar length.
SORT_POOL_CALLS = 4


def actor_batch_rows(segments_per_call: int, audio_s_per_call: float, max_segment_s: float) -> int:
    """Segment rows handed to the model actor at a time: SORT_POOL_CALLS calls' worth, counting a
    call as at most its segments and at most its audio budget of the longest segments, so the
    actor never holds more than SORT_POOL_CALLS x `audio_s_per_call` of samples (123 MB on the CPU,
    4 x 480 s; 2 GB on a GPU) however long the recordings, while short clips still fill its calls."""
    return SORT_POOL_CALLS * max(1, min(segments_per_call, int(audio_s_per_call // max_segment_s)))


def build_dataset(
    rows_to_do: pa.Table | tuple[PlanLayout, int],
    config: JobConfig,
    models: list[JobModel],
    run_id: str,
    alone: bool = False,
    crash_test: CrashTest | None = None,
):
    """The lazy Ray Dataset of segment results for `rows_to_do`, a table or a prepared plan and its
    number of rows to do (nothing runs until it is iterated): one row per speech segment, and one per
    recording that gave no segment; the driver assembles them into recordings
    (transcribe.RecordingAssembler).

    With several models (`models`, in routing order), each row is
    routed first (routing.py: the first model that serves it), and each model has its own branch of
    decode, segment (cut to the model's per-call limit) and actor pool, with its own resources; the
    branches are one union. A row no model serves goes, with its error, through the first branch.

    A batch whose worker dies twice is dropped, not retried forever (recovery.py): the driver
    finds its rows missing and runs them again with `alone`: one recording per block, one segment
    per model call. `crash_test` is for tests only (audio.isolation.CrashTest).
    """
    ray = ensure_ray()
    cluster = ray.cluster_resources()
    return segment_results(
        lambda: _input_dataset(ray, rows_to_do, cluster, alone, config), config, models, run_id, alone, crash_test
    )


def segment_results(
    inputs: Callable[[], Dataset],
    config: JobConfig,
    models: list[JobModel],
    run_id: str,
    alone: bool = False,
    crash_test: CrashTest | None = None,
) -> Dataset:
    """The lazy Ray Dataset of segment results for the normalised manifest rows that `inputs()`
    makes (called once per model branch): what the job and `transcript_rows` share."""
    ray = ensure_ray()
    pools = plan_pools(config, pool_models(models), ray.cluster_resources())
    flags = request_flags(config)
    branches = []
    for index in range(len(models)):
        ds = inputs()
        # Routing is cheap (no I/O): each branch routes its input and keeps its own rows.
        ds = ds.map_batches(
            route_table,
            fn_kwargs={
                "models": [(m.spec.model, m.profile) for m in models],
                "flags": flags,
                "keep": index if len(models) > 1 else None,
            },
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=config.resources.decode_cpus,
        )
        branches.append(_model_branch(ray, ds, config, models, index, pools, flags, run_id, alone, crash_test))
    return branches[0] if len(branches) == 1 else branches[0].union(*branches[1:])


def transcript_rows(recordings: Dataset, config: JobConfig, models: list[JobModel], run_id: str) -> Dataset:
    """`recordings` (a user's Ray Dataset of manifest-like rows) as a lazy Dataset of transcript rows
    in the output schema: normalised as manifest rows are, then the job's graph (`segment_results`),
    then one actor that joins each recording's segments (assemble.RecordingRows) as the job's driver
    does. Nothing is written."""
    normalised = recordings.map_batches(
        normalise_rows,
        fn_kwargs={"defaults": Defaults.from_config(config)},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=config.resources.decode_cpus,
    )
    segments = segment_results(lambda: normalised, config, models, run_id)
    # One actor sees every segment, so a recording's segments meet however the pool split them.
    return segments.map_batches(
        RecordingRows,
        fn_constructor_kwargs={"detect_all": config.detect_language, "threshold": config.language_threshold},
        compute=ensure_ray().data.ActorPoolStrategy(size=1),
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=0,
    )


def _input_dataset(ray, rows_to_do, cluster: dict, alone: bool, config: JobConfig):
    # At most 16 rows a block, so the model actor gets its first batch after 16 recordings are
    # decoded, not 64 (300 short clips on 2 cores: 9.9 s instead of 13.5).
    if isinstance(rows_to_do, pa.Table):
        ds = ray.data.from_arrow(_input_blocks(rows_to_do, cluster, max_rows=1 if alone else 16))
    else:
        ds = planned_rows(*rows_to_do, cluster, max_rows=rows_to_do[0].input_block_rows(16))
    ds.context.max_errored_blocks = MAX_LOST_BATCHES  # this dataset's own copy of the context
    if config.resources.object_store_mb is not None:
        # Ray Data's backpressure: operators stop launching tasks while their queued outputs would pass it.
        limits = ds.context.execution_options.resource_limits
        ds.context.execution_options.resource_limits = limits.copy(
            object_store_memory=config.resources.object_store_mb * 1e6
        )
    return ds


def _model_branch(
    ray,
    ds,
    config: JobConfig,
    models: list[JobModel],
    index: int,
    pools: list[Pool],
    flags: RequestFlags,
    run_id: str,
    alone: bool,
    crash_test: CrashTest | None,
):
    """decode -> segment -> this model's actor pool (-> its escalation stages), for the rows routed to it."""
    model = models[index]
    # What leaves these stages is segments of at most this model's call length (the job's max_segment_s,
    # or the model's own, within its per-call limits) and of the call lengths of the models it escalates
    # to, however long the recording, in tables of at most 64 MB of samples.
    targets = [models[j] for i, j in escalation_pairs(models) if i == index]
    max_segment_s = min(m.profile.call_segment_s(config.max_segment_s) for m in [model, *targets])
    # A long recording (over 17 minutes) is decoded and cut in one helper process and leaves as
    # segments (decode_cut.decode_blocks); shorter ones leave whole, and Ray Data gathers them into a
    # block until it passes its target size (128 MB), so the VAD sees a block's short clips side by
    # side (16 of them: 408x real time, against 171x at 4).
    ds = ds.map_batches(
        decode_cut.decode_blocks,
        fn_kwargs={
            "max_segment_s": max_segment_s,
            "storage_options": config.storage_options,
            "sample_rate_hz": config.sample_rate_hz,
            "max_duration_s": config.max_duration_s,
            "timeout_s": config.decode_timeout_s,
            "crash_test": crash_test,
            "allowed_prefixes": tuple(config.allowed_prefixes),
            "options": segment_options(config, model.profile),
        },
        batch_format="pyarrow",
        batch_size=1 if alone else config.decode_batch_size,
        num_cpus=config.resources.decode_cpus,
        **TASK_RETRIES,
    )
    ds = ds.map_batches(
        segment.segment_blocks,
        fn_kwargs={
            "sample_rate_hz": config.sample_rate_hz,
            "max_segment_s": max_segment_s,
            "crash_test": crash_test,
            "options": segment_options(config, model.profile),
        },
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=config.resources.decode_cpus,
        **TASK_RETRIES,
    )
    cascade = None
    if model.spec.escalates:
        cascade = Cascade(
            [(m.spec.model, m.profile) for m in models], index, model.spec.escalate_below, list(model.spec.escalate_on)
        )
    ds = _actor_stage(
        ray,
        ds,
        Transcriber,
        {"model": model, "flags": flags, "run_id": run_id, "crash_test": crash_test, "cascade": cascade},
        config,
        pools[index],
        alone,
        max_segment_s,
    )
    # A cascade: a stage per later model decodes again the segments sent on to it (escalation.py).
    stages = [(j, pools[k]) for k, (i, j) in enumerate(escalation_pairs(models), start=len(models)) if i == index]
    for position, (j, escalation_pool) in enumerate(stages):
        ds = _actor_stage(
            ray,
            ds,
            Escalator,
            {
                "model": models[j],
                "index": j,
                "flags": cascade_flags(flags, model.profile),
                "last": position == len(stages) - 1,
                "crash_test": crash_test,
            },
            config,
            escalation_pool,
            alone,
            max_segment_s,
        )
    return ds


def _actor_stage(ray, ds, actor, kwargs: dict, config: JobConfig, pool: Pool, alone: bool, max_segment_s: float):
    """`ds` through an actor pool of `actor` (a model actor class, constructed with `kwargs` and the
    model's load options) with `pool`'s resources."""
    device = config.device if config.device != "auto" else ("cuda" if pool.gpus_per_actor > 0 else "cpu")
    actor_options: dict = {}
    if pool.accelerator_type:
        actor_options["accelerator_type"] = pool.accelerator_type
    if pool.custom:
        actor_options["resources"] = dict(pool.custom)
    segments_per_call, audio_s_per_call = config.model_batch(gpu=device.startswith("cuda"))
    return ds.map_batches(
        actor,
        fn_constructor_kwargs={**kwargs, "options": load_options(config, device)},
        # Alone, an actor works on one call at a time: calls queued on an actor die with it.
        compute=ray.data.ActorPoolStrategy(
            min_size=pool.actors_min,
            max_size=pool.actors_max,
            **({"max_tasks_in_flight_per_actor": 1} if alone else {}),
        ),
        # Alone, one segment per call: a poison recording can only take its own segments down.
        batch_format="pyarrow",
        batch_size=1 if alone else actor_batch_rows(segments_per_call, audio_s_per_call, max_segment_s),
        num_gpus=pool.gpus_per_actor,
        num_cpus=pool.cpus_per_actor,
        **MODEL_ACTOR_RETRIES,
        **actor_options,
    )


def build_second_pass_dataset(
    todo: pa.Table, options: SecondPassOptions, template_source: str, model_ref: ModelRef, run_id: str
):
    """The lazy Ray Dataset of second-pass rows for the transcripts in `todo` (id, language, text)."""
    ray = ensure_ray()
    cluster = ray.cluster_resources()
    gpus = 1.0 if options.device != "cpu" and cluster.get("GPU", 0) >= 1 else 0.0
    device = options.device if options.device != "auto" else ("cuda" if gpus else "cpu")
    ds = ray.data.from_arrow(_input_blocks(todo, cluster, max_rows=256))
    return ds.map_batches(
        SecondPassWorker,
        fn_constructor_kwargs={
            "options": options,
            "template_source": template_source,
            "model_ref": model_ref,
            "run_id": run_id,
            "device": device,
        },
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=options.model_actors),
        batch_format="pyarrow",
        batch_size=options.batch_size,
        num_gpus=gpus,
        num_cpus=1,
    )


def transcripts_dataset(fs, base: str, files: list[str], schema, languages: list[str] | None = None, row_filter=None):
    """The committed `files` under `base` (a folder of `fs`; output/committed.py lists them and
    unifies their `schema`) as a lazy Ray Dataset with hive partitioning, so `language` is a column;
    only `languages` when given, rows matching `row_filter` (a pyarrow expression) when given."""
    import pyarrow.fs as pafs
    from ray.data.datasource import Partitioning

    ray = ensure_ray()
    arrow_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    if languages:
        folders = tuple(posixpath.join(base, f"language={lang}") + "/" for lang in languages)
        files = [path for path in files if path.startswith(folders)]
    if not files:
        return ray.data.from_arrow(schema.empty_table())
    ds = ray.data.read_parquet(
        files,
        filesystem=arrow_fs,
        partitioning=Partitioning("hive", base_dir=base, field_types={"language": str}, filesystem=arrow_fs),
        schema=schema.remove(schema.get_field_index("language")),
    )
    if row_filter is not None:
        ds = ds.map_batches(lambda batch: batch.filter(row_filter), batch_format="pyarrow")
    return ds


# Passed to map_batches for the model actor pool: restart a dead actor, do not retry its batch (the
# driver redoes its rows one by one).
MODEL_ACTOR_RETRIES = {"max_restarts": -1, "max_task_retries": 0}


# Passed to map_batches for the decode and segment tasks: their native work runs in a forked child
# (isolation.py), so a worker that dies anyway (killed, out of memory) is retried once, not forever.
TASK_RETRIES = {"max_retries": 1}


MAX_LOST_BATCHES = 16
