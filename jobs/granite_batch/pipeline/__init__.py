"""The one place that assembles Ray Data graphs.

    manifest rows -> decode (CPU tasks) -> segment (CPU tasks) -> Granite Speech (actor pool)
    transcripts   -> second pass (language model actor pool)
    a transcripts dataset read back as a Ray Dataset (results.to_ray)

Each graph is lazy; the drivers (run/) iterate it and write what comes out. The stages are
plain functions and classes on Arrow tables (audio, segment, transcribe, second_pass); here they
are wrapped in Ray Data's `map_batches` with their resources.

The one room that imports Ray: `cluster` (Ray itself, the pools, retries, metrics), `actors` (the model
actors), `graph` (the Ray Data graphs).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

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
    JobMetrics,
    JobModel,
    Pool,
    ResourcesDoNotFit,
    ensure_ray,
    plan_pools,
    stop_ray,
    waiting_for,
)
from granite_batch.pipeline.graph import (
    MAX_INPUT_BLOCKS,
    SORT_POOL_CALLS,
    _input_blocks,
    actor_batch_rows,
    build_dataset,
    build_second_pass_dataset,
    planned_rows,
    segment_results,
    transcript_rows,
    transcripts_dataset,
)

if TYPE_CHECKING:
    from ray.data import Dataset  # for the drivers' annotations: only this room imports Ray

__all__ = [
    "Dataset",
    "Escalator",
    "JobMetrics",
    "JobModel",
    "MAX_INPUT_BLOCKS",
    "MAX_LOST_BATCHES",
    "MODEL_ACTOR_RETRIES",
    "Pool",
    "ResourcesDoNotFit",
    "SORT_POOL_CALLS",
    "SecondPassWorker",
    "TASK_RETRIES",
    "Transcriber",
    "_input_blocks",
    "actor_batch_rows",
    "build_dataset",
    "build_second_pass_dataset",
    "ensure_ray",
    "load_options",
    "plan_pools",
    "planned_rows",
    "request_flags",
    "segment_options",
    "segment_results",
    "stop_ray",
    "transcript_rows",
    "transcripts_dataset",
    "waiting_for",
]
