"""The drivers: run a transcription job, run a second pass, transcribe a few files, evaluate an output.

A driver plans what is left to do, iterates a Ray Data graph from pipeline.py, writes what comes
out through output.py and keeps a run summary. The two long-running drivers share one skeleton
(`_Run`): a run id that is new in its output, a summary written when the run starts, after every
committed file and at the end, with status `failed` and the reason when the run stops on an error.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from granite_batch import pipeline, results
from granite_batch.config import JobConfig, load_config
from granite_batch.inference.assemble import RecordingAssembler
from granite_batch.inference.language_id import DetectionTally, identify_recordings
from granite_batch.inference.routing import ROUTE_COLUMN, route_table
from granite_batch.inputs.manifest import ManifestStream, read_manifest
from granite_batch.inputs.plan import discard_plan, plan_bucket, plan_counts, plan_folder, prepare_plan
from granite_batch.inputs.rows import Defaults
from granite_batch.models.engines import model_profile
from granite_batch.models.model import first_line, resolve_model
from granite_batch.output.committed import drop_failed_rows
from granite_batch.output.subtitles import write_subtitles
from granite_batch.output.summary import RunStats
from granite_batch.output.writer import TranscriptWriter
from granite_batch.run.bookkeeping import RunResult, TooManyFailures, _Run
from granite_batch.run.lease import LeaseTerms, discard_own_records
from granite_batch.run.preflight import check_output_root, check_run_id_unused
from granite_batch.run.recovery import crashed_rows
from granite_batch.run.second_pass import run_second_pass
from granite_batch.schema import (
    RUNS_DIR,
    TRANSCRIPTS_DIR,
    transcript_schema,
)
from granite_batch.storage import filesystem

log = logging.getLogger(__name__)


def _quality(table: pa.Table) -> dict:
    """Corpus-level WER/CER/BLEU/chrF of this run's rows that have a reference (needs the eval extra).
    Never fails the run: a scoring problem is reported in the summary instead."""
    try:
        from granite_batch.evaluate import score_table
    except ImportError as exc:
        return {"skipped": f"install granite-batch[eval] for quality figures ({exc.name} missing)"}
    try:
        scores = score_table(table)
    except Exception as exc:
        log.warning("quality figures failed", exc_info=True)
        return {"skipped": f"scoring failed: {type(exc).__name__}: {first_line(exc)}"}
    return {key: scores[key] for key in ("rows_scored", "rows_skipped", "overall", "by_task")}


def run_job(config: JobConfig, progress: bool = True) -> RunResult:
    """Run one transcription job end to end. Raises ConfigError / ManifestError / ModelLoadError
    before any work is done, TooManyFailures after writing everything when failed rows exceed
    `max_failed_fraction`.

    Ids that already have a row in the output are skipped (with `retry_failed`, only those with a
    successful row), so re-running the same command after a crash finishes the rest.
    """
    check_output_root(config.output, config.storage_options)
    if config.run_id is not None:
        check_run_id_unused(config.output, config.run_id, config.storage_options)
    run = _Run(config.output, RUNS_DIR, config.run_id, config.storage_options)
    stream = ManifestStream(
        config.manifest or config.input,
        Defaults.from_config(config),
        config.storage_options,
        listing=config.manifest is None,
    )
    fs, root = filesystem(config.output, config.storage_options)
    output_existed = fs.exists(root)
    lease_terms = LeaseTerms(config.lease, config.lease_expiry_s, config.lease_wait_s)

    def plan():
        # Bucketed by id on the output's filesystem, so the driver never holds the manifest (plan.py).
        return prepare_plan(
            stream,
            config.output,
            plan_folder(config.output, run.run_id),
            config.storage_options,
            retry_failed=config.retry_failed,
        )

    try:
        layout = run.plan(TRANSCRIPTS_DIR, lease_terms, plan)
        # Every model of the job, in routing order; the first is the run's `model` in the summary.
        model_refs = [
            resolve_model(spec.model, spec.revision, config.trust_remote_code) for spec in config.model_specs()
        ]
        for spec in config.model_specs():  # a checkpoint that is no Granite Speech stops the job here (exit 3)
            model_profile(spec.model, spec.revision, config.trust_remote_code, spec.profile)
        model_ref = model_refs[0]
    except BaseException:  # a bad manifest or model: nothing was done, so nothing is left behind
        run.lease.release()
        if not output_existed:
            discard_own_records(config.output, run.run_id, config.storage_options)
        discard_plan(config.output, run.run_id, config.storage_options, output_created=not output_existed)
        raise
    planned = plan_counts(layout)
    if config.retry_failed and layout.committed.failed_files:
        # A crash after this leaves the failed ids with no row, so they are redone, never with two.
        drop_failed_rows(config.output, layout.committed.failed_files, config.storage_options)
    log.info(
        "run %s: %d rows to do, %d already done, %d duplicates, from %s",
        run.run_id,
        planned["rows_to_do"],
        planned["rows_already_done"],
        planned["duplicates"],
        config.manifest or config.input,
    )

    stats = RunStats()
    detection = DetectionTally(config.language_threshold)

    def identified(recordings: pa.Table) -> pa.Table:
        # `language: auto` rows get their partition from their transcript (language_id.py), so this
        # runs before anything reads a row's language: subtitles, counts, the writer's partitions.
        return identify_recordings(
            recordings, detect_all=config.detect_language, threshold=config.language_threshold, tally=detection
        )

    assembler: RecordingAssembler | None = None
    scored_columns = ["id", "language", "task", "target_language", "text", "error", "reference"]
    with_reference: list[pa.Table] = []  # the small part of each batch that quality figures need
    redone_alone = 0
    keywords_dropped = Counter()
    writer = TranscriptWriter(
        config.output,
        run.run_id,
        transcript_schema(layout.schema),
        config.storage_options,
        config.rows_per_file,
        config.commit_interval_s,
        before_commit=run.lease.check,
    )

    def summary(status: str) -> dict:
        wall_s = run.wall_s()
        return {
            **run.times(status),
            "manifest_files": layout.manifest_files,
            "rows_in": layout.rows_in,
            "duplicates": planned["duplicates"],
            "ids_replaced": layout.ids_replaced,
            "rows_already_done": planned["rows_already_done"],
            "rows_to_do": planned["rows_to_do"],
            "rows_retried": planned["rows_retried"],
            "foreign_files": layout.committed.foreign_files,
            "rows_written": stats.rows_written,
            "rows_ok": stats.rows_ok,
            "rows_failed": stats.rows_failed,
            "failures_by_reason": dict(stats.failures_by_reason.most_common()),
            "rows_by_language": dict(sorted(stats.rows_by_language.items())),
            "language_detection": detection.as_dict() if detection.rows else None,
            "rows_incomplete": assembler.pending if assembler else 0,
            "decoding": {language: dict(sorted(counts.items())) for language, counts in sorted(stats.decoding.items())},
            "inference": {model: figures.summary() for model, figures in assembler.inference.items()}
            if assembler
            else {},
            "audio_s": round(stats.audio_s, 3),
            "audio_hours": round(stats.audio_s / 3600, 4),
            "wall_s": round(wall_s, 3),
            "real_time_factor": round(stats.audio_s / wall_s, 3) if wall_s > 0 else None,
            "model": model_ref.name,
            "model_revision": model_ref.revision,
            "models": [{"model": ref.name, "model_revision": ref.revision} for ref in model_refs],
            "files": list(writer.committed),
            "rows_redone_alone": redone_alone,
            "keywords_dropped": dict(keywords_dropped),
            "config": config.public_dict(),
        }

    def on_batch(batch: pa.Table) -> None:
        # Before the rows: once a row is committed its id is done, so its subtitles must exist.
        write_subtitles(batch, config.output, config.subtitles, run.run_id, config.storage_options)
        stats.add(batch)
        if "keywords_dropped" in batch.column_names:
            dropped = [count for count in batch.column("keywords_dropped").to_pylist() if count]
            keywords_dropped.update(rows=len(dropped), keywords=sum(dropped))
        if "reference" in batch.column_names:
            referenced = batch.filter(pc.is_valid(batch.column("reference")))
            if referenced.num_rows:
                with_reference.append(referenced.select(scored_columns))

    run.summary = summary
    with run:
        if planned["rows_to_do"]:
            pipeline.ensure_ray().data.DataContext.get_current().enable_progress_bars = progress
            segments = pipeline.build_dataset((layout, planned["rows_to_do"]), config, model_refs, run.run_id)
            assembler = RecordingAssembler()
            run.stream(_recordings(segments, assembler, identified), writer, on_batch)
            if stats.rows_written + assembler.pending < planned["rows_to_do"]:
                # Batches whose worker died twice were dropped (recovery.py): find their rows by planning
                # again against what is now committed, redo each recording alone, then error rows.
                writer.commit_open()
                lost = _still_to_do(config, run.run_id, attempt=1)
                log.warning("%d rows lost with batches whose worker died; redoing them one by one", lost.num_rows)
                redone_alone = lost.num_rows
                if lost.num_rows:
                    alone = pipeline.build_dataset(lost, config, model_refs, run.run_id, alone=True)
                    run.stream(_recordings(alone, assembler, identified), writer, on_batch)
                    writer.commit_open()
                    still_lost = _still_to_do(config, run.run_id, attempt=2)
                    crashed = crashed_rows(
                        still_lost, writer.schema, *_routed_models(still_lost, config, model_refs), run.run_id
                    )
                    if crashed.num_rows:
                        crashed = identified(crashed)
                        on_batch(crashed)
                        writer.write(crashed)
            if assembler.pending:  # never written half: the next run redoes them
                log.warning("%d recordings did not receive all their segments; a re-run redoes them", assembler.pending)
        writer.close()  # removes the run's staging folder, the plans included
        failed_fraction = stats.rows_failed / stats.rows_written if stats.rows_written else 0.0
        too_many = failed_fraction > config.max_failed_fraction
        extra = {"quality": _quality(pa.concat_tables(with_reference))} if with_reference else {}
        path = run.write("too_many_failures" if too_many else "succeeded", **extra)
    if config.second_pass is not None:  # over every committed transcript, this run's included
        run_second_pass(config.output, config.second_pass, config.storage_options, run.run_id, progress, lease_terms)
    if too_many:
        raise TooManyFailures(
            f"{stats.rows_failed} of {stats.rows_written} rows failed ({failed_fraction:.1%}), "
            f"more than max_failed_fraction {config.max_failed_fraction:.1%}; summary: {path}"
        )
    return RunResult(run.run_id, run.last, path, list(writer.committed))


def _routed_models(rows: pa.Table, config: JobConfig, model_refs: list) -> tuple[list[str], list[str | None]]:
    """The name and revision of the model each of `rows` goes to, routed as the job routes them
    (routing.route_table: the first model that serves it; the first model for a row none serves)."""
    if len(model_refs) == 1:
        return [model_refs[0].name] * rows.num_rows, [model_refs[0].revision] * rows.num_rows
    models = pipeline.job_models(config, model_refs)
    routed = route_table(rows, [(spec.model, profile) for spec, _, profile in models], pipeline.request_flags(config))
    refs = [model_refs[i] for i in routed.column(ROUTE_COLUMN).to_pylist()]
    return [ref.name for ref in refs], [ref.revision for ref in refs]


def _still_to_do(config: JobConfig, run_id: str, attempt: int) -> pa.Table:
    """The manifest rows that still have no committed row, planned again (bounded like the first plan);
    used only when a run got back fewer rows than it planned, so the result is small."""
    stream = ManifestStream(
        config.manifest or config.input,
        Defaults.from_config(config),
        config.storage_options,
        listing=config.manifest is None,
    )
    layout = prepare_plan(
        stream, config.output, f"{plan_folder(config.output, run_id)}-lost-{attempt}", config.storage_options
    )
    tables = [todo for todo, _ in (plan_bucket(layout, b) for b in range(layout.buckets)) if todo.num_rows]
    return pa.concat_tables(tables, promote_options="permissive") if tables else layout.schema.empty_table()


def _recordings(segments, assembler: RecordingAssembler, finish: Callable[[pa.Table], pa.Table]):
    """The complete recordings' rows, as their last segments arrive from the Ray dataset, through `finish`."""
    for batch in segments.iter_batches(batch_format="pyarrow", batch_size=None):
        recordings = assembler.add(batch)
        if recordings is not None:
            yield finish(recordings)


def transcribe_files(
    paths: Iterable[str | Path | dict], output: str | Path, model: str | None = None, progress: bool = False, **options
) -> pa.Table:
    """Run a job over `paths` (recording paths or URIs, or manifest rows as dicts) into `output`
    and return those recordings' rows. `options` are job config fields (`language`, `task`,
    `target_language`, `generation={"max_new_tokens": 64}`, ...). Recordings that already have a
    row in `output` are not redone; their existing rows are returned with the new ones.
    Raises ConfigError, ManifestError, ModelLoadError or TooManyFailures, as `granite-batch run`
    exits on them."""
    rows = [dict(p) if isinstance(p, dict) else {"audio": str(p)} for p in paths]
    for row in rows:
        # The manifest lives in a temporary folder: relative paths must not resolve against it.
        if "://" not in row["audio"]:
            row["audio"] = str(Path(row["audio"]).resolve())
    with tempfile.TemporaryDirectory(prefix="granite-batch-") as folder:
        manifest_path = Path(folder) / "manifest.jsonl"
        manifest_path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
        overrides = {"manifest": str(manifest_path), "output": str(output), "model": model, **options}
        config = load_config(overrides=overrides)
        ids = read_manifest(config.manifest, Defaults.from_config(config), config.storage_options).table.column("id")
        run_job(config, progress=progress)
    table = results.load(config.output, storage_options=config.storage_options)
    return table.filter(pc.is_in(table.column("id"), value_set=ids.combine_chunks()))
