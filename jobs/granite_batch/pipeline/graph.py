"""The lazy Ray Data graphs: manifest rows -> decode -> segment -> model pools (-> escalation stages), a
user's Dataset through the same stages (`build_processor`), transcripts -> second pass, and an output
read back as a Ray Dataset."""

from __future__ import annotations

import functools
import logging
import math
import posixpath
from collections.abc import Callable
from typing import TYPE_CHECKING

import pyarrow as pa

from granite_batch.audio import decode_cut, segment
from granite_batch.audio.isolation import CrashTest
from granite_batch.audio.sessions import Sessions
from granite_batch.config import JobConfig, SecondPassOptions
from granite_batch.inference.assemble import RecordingRows
from granite_batch.inference.escalation import (
    Cascade,
    cascade_flags,
    escalation_pairs,
    pool_models,
)
from granite_batch.inference.routing import RequestFlags, route_table, session_rows
from granite_batch.inputs.normalise import normalise_rows
from granite_batch.inputs.plan import PlanLayout, plan_bucket
from granite_batch.inputs.rows import Defaults
from granite_batch.models.hub import ModelRef

if TYPE_CHECKING:
    from ray.data import Dataset


from granite_batch.pipeline.actors import (
    Escalator,
    SecondPassWorker,
    Transcriber,
    load_options,
    request_flags,
    segment_options,
)
from granite_batch.pipeline.cluster import (
    MAX_LOST_BATCHES,
    MODEL_ACTOR_RETRIES,
    TASK_RETRIES,
    JobModel,
    Pool,
    ensure_ray,
    map_batches_with_retries,
    plan_pools,
)

log = logging.getLogger(__name__)


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
    # A model that labels speakers gets the rows asking for them as sessions of calls (audio/sessions.py).
    sessions = None
    if model.profile.speakers:
        wants = functools.partial(session_rows, flags=flags, profile=model.profile)
        sessions = Sessions(wants, max(config.speaker_session_s, max_segment_s))
    # The longest row the actors take: a session where the job asks for speakers, so an actor's batch
    # (actor_batch_rows) still bounds the samples it holds.
    max_row_s = sessions.max_session_s if sessions is not None and flags.speakers else max_segment_s
    # A long recording (over 17 minutes) is decoded and cut in one helper process and leaves as
    # segments (decode_cut.decode_blocks); shorter ones leave whole, and Ray Data gathers them into a
    # block until it passes its target size (128 MB), so the VAD sees a block's short clips side by
    # side (16 of them: 408x real time, against 171x at 4).
    ds = map_batches_with_retries(
        ds,
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
            "sessions": sessions,
        },
        batch_format="pyarrow",
        batch_size=1 if alone else config.decode_batch_size,
        num_cpus=config.resources.decode_cpus,
        retries=TASK_RETRIES,
    )
    ds = map_batches_with_retries(
        ds,
        segment.segment_blocks,
        fn_kwargs={
            "sample_rate_hz": config.sample_rate_hz,
            "max_segment_s": max_segment_s,
            "crash_test": crash_test,
            "options": segment_options(config, model.profile),
            "sessions": sessions,
        },
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=config.resources.decode_cpus,
        retries=TASK_RETRIES,
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
        max_row_s,
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
            max_row_s,
        )
    return ds


def _actor_stage(ray, ds, actor, kwargs: dict, config: JobConfig, pool: Pool, alone: bool, max_row_s: float):
    """`ds` through an actor pool of `actor` (a model actor class, constructed with `kwargs` and the
    model's load options) with `pool`'s resources."""
    device = config.device if config.device != "auto" else ("cuda" if pool.gpus_per_actor > 0 else "cpu")
    actor_options: dict = {}
    if pool.accelerator_type:
        actor_options["accelerator_type"] = pool.accelerator_type
    if pool.custom:
        actor_options["resources"] = dict(pool.custom)
    segments_per_call, audio_s_per_call = config.model_batch(gpu=device.startswith("cuda"))
    return map_batches_with_retries(
        ds,
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
        batch_size=1 if alone else actor_batch_rows(segments_per_call, audio_s_per_call, max_row_s),
        num_gpus=pool.gpus_per_actor,
        num_cpus=pool.cpus_per_actor,
        retries=MODEL_ACTOR_RETRIES,
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
