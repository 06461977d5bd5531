"""The one place that assembles Ray Data graphs, and runs a job.

    manifest rows -> decode (CPU tasks) -> segment (CPU tasks) -> Granite Speech (actor pool)
                  -> driver: Parquet files per language + run summary
    transcripts -> second pass (language model actor pool) -> driver: its Parquet dataset
"""

from __future__ import annotations

import logging
import math
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone

import pyarrow as pa
import pyarrow.compute as pc

from granite_batch import audio, segment
from granite_batch.config import JobConfig, SecondPassOptions
from granite_batch.manifest import Defaults, list_recordings, read_manifest
from granite_batch.model import ModelRef, SpeechModel, resolve_model, transcribe_table
from granite_batch.second_pass import LanguageModel, Prompter, second_pass_table
from granite_batch.speculative import SpeculativeOptions
from granite_batch.subtitles import write_subtitles
from granite_batch.output import (
    RunStats,
    TranscriptWriter,
    drop_rows,
    read_committed,
    transcript_schema,
    write_summary,
)

log = logging.getLogger(__name__)


class TooManyFailures(RuntimeError):
    """More rows failed than `max_failed_fraction` allows; the summary is written all the same."""


@dataclass
class RunResult:
    run_id: str
    summary: dict
    summary_path: str
    files: list[str]


def new_run_id() -> str:
    """Sortable by start time, unique across concurrent runs."""
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:8]


class Transcriber:
    """Model actor: loads the model once, then maps batches of decoded recordings to transcripts."""

    def __init__(self, config: JobConfig, model_ref: ModelRef, run_id: str, device: str):
        self.model_ref = model_ref
        self.run_id = run_id
        self.speech_model = SpeechModel.load(
            config.model, config.revision, device=device, dtype=config.dtype,
            trust_remote_code=config.trust_remote_code,
            max_new_tokens=config.generation.max_new_tokens,
            max_new_tokens_per_audio_s=config.generation.max_new_tokens_per_audio_s, num_beams=config.generation.num_beams,
            repetition_penalty=config.generation.repetition_penalty, max_batch_audio_s=config.max_batch_audio_s,
            speculative=SpeculativeOptions(config.generation.decoding, config.generation.ctc_entropy_threshold,
                                           config.generation.verify_threshold),
        )

    def __call__(self, batch: pa.Table) -> pa.Table:
        table = transcribe_table(batch, self.speech_model)
        n = table.num_rows
        table = table.append_column("model", pa.array([self.model_ref.name] * n, pa.string()))
        table = table.append_column("model_revision", pa.array([self.model_ref.revision] * n, pa.string()))
        return table.append_column("run_id", pa.array([self.run_id] * n, pa.string()))


class SecondPassWorker:
    """Language model actor: loads the model once, then maps batches of transcripts to second-pass rows."""

    def __init__(self, options: SecondPassOptions, template_source: str, model_ref: ModelRef, run_id: str,
                 device: str):
        self.options = options
        self.model_ref = model_ref
        self.run_id = run_id
        self.lm = LanguageModel.load(
            options.model, options.revision, device=device, dtype=options.dtype,
            max_new_tokens=options.max_new_tokens, batch_size=options.batch_size,
            max_batch_tokens=options.max_batch_tokens, context_tokens=options.context_tokens,
        )
        self.prompter = Prompter(self.lm.tokenizer, template_source, options.question)

    def __call__(self, batch: pa.Table) -> pa.Table:
        table = second_pass_table(batch, self.lm, self.prompter)
        n = table.num_rows
        for column, value in [("name", self.options.dataset_name), ("model", self.model_ref.name),
                              ("model_revision", self.model_ref.revision), ("run_id", self.run_id)]:
            table = table.append_column(column, pa.array([value] * n, pa.string()))
        return table


def _ensure_ray():
    import ray

    if not ray.is_initialized():
        # Connects to RAY_ADDRESS / a running cluster when there is one, else starts a local Ray.
        ray.init(logging_level=logging.WARNING, log_to_driver=True)
    return ray


# Each input block is one object put by the driver: past this many, blocks grow instead.
MAX_INPUT_BLOCKS = 100_000


def _input_blocks(table: pa.Table, cluster: dict, max_rows: int) -> list[pa.Table]:
    """Slices of `table`: enough to keep every CPU of the cluster busy, at most `max_rows` rows each
    (more for manifests of over `MAX_INPUT_BLOCKS` * `max_rows` rows)."""
    rows = table.num_rows
    per_cpu = math.ceil(rows / max(2, 2 * int(cluster.get("CPU", 1))))
    block_rows = max(1, min(max_rows, per_cpu), math.ceil(rows / MAX_INPUT_BLOCKS))
    return [table.slice(i, block_rows) for i in range(0, rows, block_rows)]


def build_dataset(rows_to_do: pa.Table, config: JobConfig, model_ref: ModelRef, run_id: str):
    """The lazy Ray Dataset of transcript rows for `rows_to_do` (nothing runs until it is iterated)."""
    ray = _ensure_ray()
    cluster = ray.cluster_resources()
    gpus_per_actor = config.resources.gpus_per_actor
    if gpus_per_actor is None:
        gpus_per_actor = 1.0 if cluster.get("GPU", 0) >= 1 else 0.0
    device = config.device if config.device != "auto" else ("cuda" if gpus_per_actor > 0 else "cpu")

    # At most 16 rows a block, so the model actor gets its first batch after 16 recordings are
    # decoded, not 64 (300 short clips on 2 cores: 9.9 s instead of 13.5).
    ds = ray.data.from_arrow(_input_blocks(rows_to_do, cluster, max_rows=16))

    ds = ds.map_batches(
        audio.decode_table,
        fn_kwargs={"storage_options": config.storage_options, "sample_rate_hz": config.sample_rate_hz,
                   "max_duration_s": config.max_duration_s, "timeout_s": config.decode_timeout_s},
        batch_format="pyarrow", batch_size=config.decode_batch_size, num_cpus=config.resources.decode_cpus,
    )
    # Whole blocks: Ray Data gathers decoded batches into a block until it passes its target size
    # (128 MB), so the VAD sees a block's short clips side by side (16 of them: 408x real time, against
    # 171x at 4) while long recordings still come one decode batch at a time.
    ds = ds.map_batches(
        segment.segment_table,
        fn_kwargs={"sample_rate_hz": config.sample_rate_hz, "max_segment_s": config.max_segment_s},
        batch_format="pyarrow", batch_size=None, num_cpus=config.resources.decode_cpus,
    )
    actor_options = {}
    if config.resources.accelerator_type:
        actor_options["accelerator_type"] = config.resources.accelerator_type
    if config.resources.actor_resources:
        actor_options["resources"] = dict(config.resources.actor_resources)
    return ds.map_batches(
        Transcriber,
        fn_constructor_kwargs={"config": config, "model_ref": model_ref, "run_id": run_id, "device": device},
        compute=ray.data.ActorPoolStrategy(
            min_size=config.resources.model_actors_min, max_size=config.resources.model_actors_max
        ),
        batch_format="pyarrow", batch_size=config.batch_size,
        num_gpus=gpus_per_actor, num_cpus=config.resources.cpus_per_actor, **actor_options,
    )


def build_second_pass_dataset(todo: pa.Table, options: SecondPassOptions, template_source: str,
                              model_ref: ModelRef, run_id: str):
    """The lazy Ray Dataset of second-pass rows for the transcripts in `todo` (id, language, text)."""
    ray = _ensure_ray()
    cluster = ray.cluster_resources()
    gpus = 1.0 if options.device != "cpu" and cluster.get("GPU", 0) >= 1 else 0.0
    device = options.device if options.device != "auto" else ("cuda" if gpus else "cpu")
    ds = ray.data.from_arrow(_input_blocks(todo, cluster, max_rows=256))
    return ds.map_batches(
        SecondPassWorker,
        fn_constructor_kwargs={"options": options, "template_source": template_source, "model_ref": model_ref,
                               "run_id": run_id, "device": device},
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=options.model_actors),
        batch_format="pyarrow", batch_size=options.batch_size, num_gpus=gpus, num_cpus=1,
    )


def _quality(table: pa.Table) -> dict:
    """Corpus-level WER/CER/BLEU/chrF of this run's rows that have a reference (needs the eval extra)."""
    try:
        from granite_batch.evaluate import score_table
    except ImportError as exc:
        return {"skipped": f"install granite-batch[eval] for quality figures ({exc.name} missing)"}
    scores = score_table(table)
    return {key: scores[key] for key in ("rows_scored", "rows_skipped", "overall", "by_task")}


def run(config: JobConfig, progress: bool = True) -> RunResult:
    """Run one job end to end. Raises ManifestError / ModelLoadError before any work is done,
    TooManyFailures after writing everything when failed rows exceed `max_failed_fraction`.

    Ids that already have a row in the output are skipped (with `retry_failed`, only those with a
    successful row), so re-running the same command after a crash finishes the rest.
    """
    started_at = datetime.now(timezone.utc)
    clock = time.monotonic()
    run_id = config.run_id or new_run_id()
    defaults = Defaults(config.language, config.task, config.target_language, tuple(config.keywords),
                        tuple(config.allowed_prefixes))
    if config.manifest is not None:
        manifest = read_manifest(config.manifest, defaults, config.storage_options)
    else:
        manifest = list_recordings(config.input, defaults, config.storage_options)
    model_ref = resolve_model(config.model, config.revision, config.trust_remote_code)

    committed = read_committed(config.output, config.storage_options)
    if config.retry_failed and committed.failed:
        drop_rows(config.output, committed.failed, config.storage_options)
    skip = committed.ids(include_failed=not config.retry_failed)
    todo = manifest.table.filter(pc.invert(pc.is_in(manifest.table.column("id"), value_set=skip)))
    already_done = manifest.table.num_rows - todo.num_rows
    log.info("run %s: %d rows to do, %d already done, %d duplicates, from %s", run_id, todo.num_rows,
             already_done, manifest.duplicates, config.manifest or config.input)

    stats = RunStats()
    scored_columns = ["id", "language", "task", "target_language", "text", "error", "reference"]
    with_reference: list[pa.Table] = []  # the small part of each batch that quality figures need
    schema = transcript_schema(manifest.table.schema)
    writer = TranscriptWriter(config.output, run_id, schema, config.storage_options,
                              config.rows_per_file, config.commit_interval_s)

    def summary(status: str) -> dict:
        wall_s = time.monotonic() - clock
        return {
            "run_id": run_id,
            "status": status,
            "started_at": started_at.isoformat(),
            "finished_at": datetime.now(timezone.utc).isoformat() if status != "running" else None,
            "manifest_files": manifest.files,
            "rows_in": manifest.rows_in,
            "duplicates": manifest.duplicates,
            "rows_already_done": already_done,
            "rows_to_do": todo.num_rows,
            "rows_written": stats.rows_written,
            "rows_ok": stats.rows_ok,
            "rows_failed": stats.rows_failed,
            "failures_by_reason": dict(stats.failures_by_reason.most_common()),
            "rows_by_language": dict(sorted(stats.rows_by_language.items())),
            "decoding": {language: dict(sorted(counts.items())) for language, counts in sorted(stats.decoding.items())},
            "audio_s": round(stats.audio_s, 3),
            "audio_hours": round(stats.audio_s / 3600, 4),
            "wall_s": round(wall_s, 3),
            "real_time_factor": round(stats.audio_s / wall_s, 3) if wall_s > 0 else None,
            "model": model_ref.name,
            "model_revision": model_ref.revision,
            "files": list(writer.committed),
            "config": config.public_dict(),
        }

    # A summary exists from the start, so a run killed at any moment still shows what it did.
    write_summary(config.output, run_id, summary("running"), config.storage_options)
    if todo.num_rows:
        ray = _ensure_ray()
        ray.data.DataContext.get_current().enable_progress_bars = progress
        ds = build_dataset(todo, config, model_ref, run_id)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            # Before the rows: once a row is committed its id is done, so its subtitles must exist.
            write_subtitles(batch, config.output, config.subtitles, run_id, config.storage_options)
            files_before = len(writer.committed)
            writer.write(batch)
            stats.add(batch)
            if "reference" in batch.column_names:
                referenced = batch.filter(pc.is_valid(batch.column("reference")))
                if referenced.num_rows:
                    with_reference.append(referenced.select(scored_columns))
            if len(writer.committed) != files_before:
                write_summary(config.output, run_id, summary("running"), config.storage_options)
    writer.close()

    failed_fraction = stats.rows_failed / stats.rows_written if stats.rows_written else 0.0
    too_many = failed_fraction > config.max_failed_fraction
    final = summary("too_many_failures" if too_many else "succeeded")
    if with_reference:
        final["quality"] = _quality(pa.concat_tables(with_reference))
    path = write_summary(config.output, run_id, final, config.storage_options)
    if config.second_pass is not None:  # over every committed transcript, this run's included
        from granite_batch.second_pass import run_second_pass
        run_second_pass(config.output, config.second_pass, config.storage_options, run_id, progress)
    if too_many:
        raise TooManyFailures(
            f"{stats.rows_failed} of {stats.rows_written} rows failed ({failed_fraction:.1%}), "
            f"more than max_failed_fraction {config.max_failed_fraction:.1%}; summary: {path}"
        )
    return RunResult(run_id, final, path, list(writer.committed))
