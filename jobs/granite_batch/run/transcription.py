"""The drivers: run a transcription job, run a second pass, transcribe a few files, evaluate an output.

A driver plans what is left to do, iterates a Ray Data graph from pipeline/, writes what comes
out through output.py and keeps a run summary. The two long-running drivers share one skeleton
(`_Run`): a run id that is new in its output, a summary written when the run starts, after every
committed file and at the end, with status `failed` and the reason when the run stops on an error.
"""

from __future__ import annotations

import json
import logging
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from granite_batch import pipeline, results
from granite_batch.audio.isolation import CrashTest
from granite_batch.config import ConfigError, JobConfig, load_config
from granite_batch.inference.assemble import RecordingAssembler
from granite_batch.inference.escalation import pool_models
from granite_batch.inference.language_id import DetectionTally, identify_recordings
from granite_batch.inference.quality import mark_language_mismatch
from granite_batch.inference.routing import ROUTE_COLUMN, route_table
from granite_batch.inputs.manifest import ManifestStream, read_manifest
from granite_batch.inputs.plan import discard_plan, plan_bucket, plan_counts, plan_folder, prepare_plan
from granite_batch.inputs.redo import SelectionError, parse_selections
from granite_batch.inputs.rows import Defaults
from granite_batch.models.engines import engine_problem, model_profile
from granite_batch.models.hub import first_line, resolve_model
from granite_batch.output.committed import drop_failed_rows, list_dataset_files
from granite_batch.output.compact import finish_compactions
from granite_batch.output.delta import DeltaWriter, is_delta
from granite_batch.output.replace import Replacements
from granite_batch.output.subtitles import write_subtitles
from granite_batch.output.summary import RunStats, batch_counts, reap_dead_runs
from granite_batch.output.writer import TranscriptWriter
from granite_batch.pipeline import JobModel
from granite_batch.run.bookkeeping import RunResult, TooManyFailures, _Run, interrupts_deferred
from granite_batch.run.lease import LeaseTerms, discard_own_records
from granite_batch.run.preflight import check_output_root, check_run_id_unused
from granite_batch.run.progress import Progress
from granite_batch.run.recovery import crashed_rows
from granite_batch.run.second_pass import run_second_pass
from granite_batch.schema import (
    RUNS_DIR,
    TRANSCRIPTS_DIR,
    transcript_schema,
)
from granite_batch.storage import OutputRoot

log = logging.getLogger(__name__)
# What the run's quality figures read of each row with a reference.
SCORED_COLUMNS = ["id", "language", "task", "target_language", "text", "error", "reference"]


def _quality(table: pa.Table) -> dict:
    """Corpus-level WER/CER/BLEU/chrF of this run's rows that have a reference (needs the eval extra).
    Never fails the run: a scoring problem is reported in the summary instead."""
    try:
        from granite_batch.evaluate import score_table
    except ImportError as exc:
        return {
            "skipped": f"install the eval extra (pip install -e '.[eval]') for quality figures ({exc.name} missing)"
        }
    try:
        scores = score_table(table)
    except Exception as exc:
        log.warning("quality figures failed", exc_info=True)
        return {"skipped": f"scoring failed: {type(exc).__name__}: {first_line(exc)}"}
    return {key: scores[key] for key in ("rows_scored", "rows_skipped", "overall", "by_task")}


class StallWarning:
    """Logs a warning each time `after_s` pass without `progress()`, naming what the cluster has free."""

    def __init__(self, after_s: float):
        self.after_s = after_s
        self.last = time.monotonic()
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._watch, name="granite-batch-stall", daemon=True)

    def __enter__(self) -> StallWarning:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stopped.set()

    def progress(self) -> None:
        self.last = time.monotonic()

    def _watch(self) -> None:
        while not self.stopped.wait(min(self.after_s, 30.0)):
            idle = time.monotonic() - self.last
            if idle >= self.after_s:
                try:
                    free = pipeline.waiting_for()
                except Exception as exc:  # Ray itself may be what stopped
                    free = f"Ray did not answer ({type(exc).__name__})"
                log.warning("no recording finished for %.0f s; the cluster has %s", idle, free)
                self.last = time.monotonic()


def resolve_job_models(config: JobConfig) -> list[JobModel]:
    """Every model of the job in routing order, resolved once here on the driver: its exact revision
    and its profile (a checkpoint that is no Granite Speech, or cannot be read, stops the job: exit 3)."""
    models = []
    for spec in config.model_specs():
        ref = resolve_model(spec.model, spec.revision, config.trust_remote_code)
        profile = model_profile(spec.model, spec.revision, config.trust_remote_code, spec.profile)
        problem = engine_problem(spec.engine or config.engine, profile, config.word_timestamps)
        if problem:
            raise ConfigError(f"model {spec.model}: {problem}")
        models.append(JobModel(spec, ref, profile))
    return models


def run_job(config: JobConfig, progress: bool = True, crash_test: CrashTest | None = None) -> RunResult:
    """Run one transcription job end to end. Raises ConfigError / ManifestError / ModelLoadError
    before any work is done, TooManyFailures after writing everything when failed rows exceed
    `max_failed_fraction`.

    Ids that already have a row in the output are skipped (with `retry_failed`, only those with a
    successful row), so re-running the same command after a crash finishes the rest. `crash_test`
    is for tests only (audio.isolation.CrashTest).
    """
    return TranscriptionRun(config, progress, crash_test).run()


class TranscriptionRun:
    """One transcription run, step by step: prepare (plan and resolve the models, leaving nothing
    behind when either fails), transcribe (stream the pipeline's recordings into the writer),
    recover (redo alone the rows lost with a dying worker), finish (summary, second pass)."""

    def __init__(self, config: JobConfig, progress: bool = True, crash_test: CrashTest | None = None):
        self.config = config
        self.output = OutputRoot(config.output, config.storage_options)  # the run's one output filesystem
        self.progress = progress
        self.crash_test = crash_test
        self.stats = RunStats()
        self.detection = DetectionTally(config.language_threshold)
        self.assembler = RecordingAssembler()
        self.with_reference: list[pa.Table] = []  # the small part of each batch that quality figures need
        self.redone_alone = 0
        self.keywords_dropped: Counter[str] = Counter()
        self.metrics: pipeline.JobMetrics | None = None
        self.shown: Progress | None = None

    def run(self) -> RunResult:
        config = self.config
        self.prepare()
        with self.bookkeeping:
            try:
                if self.planned["rows_to_do"]:
                    self.transcribe()
            except KeyboardInterrupt:
                # Every row written so far is whole: commit them, and leave no staging (plans included).
                with interrupts_deferred():
                    self.writer.close()
                raise
            self.writer.close()  # removes the run's staging folder, the plans included
            failed_fraction = self.stats.rows_failed / self.stats.rows_written if self.stats.rows_written else 0.0
            too_many = failed_fraction > config.max_failed_fraction
            extra = {"quality": _quality(pa.concat_tables(self.with_reference))} if self.with_reference else {}
            path = self.bookkeeping.write("too_many_failures" if too_many else "succeeded", **extra)
        if config.second_pass is not None:  # over every committed transcript, this run's included
            run_second_pass(
                self.output,
                config.second_pass,
                self.bookkeeping.run_id,
                self.progress,
                self.lease_terms,
            )
        if too_many:
            raise TooManyFailures(
                f"{self.stats.rows_failed} of {self.stats.rows_written} rows failed ({failed_fraction:.1%}), "
                f"more than max_failed_fraction {config.max_failed_fraction:.1%}; summary: {path}"
            )
        return RunResult(self.bookkeeping.run_id, self.bookkeeping.last, path, list(self.writer.committed))

    def prepare(self) -> None:
        """Check the output, take its lease, plan what is left and resolve the models; a bad manifest
        or model stops here with nothing left behind."""
        config, output = self.config, self.output
        try:
            redo = parse_selections(config.redo)
        except SelectionError as exc:
            raise ConfigError(f"redo: {exc}") from None
        self.replacements = Replacements()
        check_output_root(output)
        delta = check_output_format(config, output)
        if config.run_id is not None:
            check_run_id_unused(output, config.run_id)
        run = self.bookkeeping = _Run(output, RUNS_DIR, config.run_id)
        stream = ManifestStream(
            config.manifest or config.input,
            Defaults.from_config(config),
            config.storage_options,
            listing=config.manifest is None,
        )
        output_existed = output.fs.exists(output.path)
        self.lease_terms = LeaseTerms(config.lease, config.lease_expiry_s, config.lease_wait_s)
        # A Delta table's commits keep one row per id (output/delta.py); a second pass still takes its lease.
        transcripts_terms = LeaseTerms("table") if delta else self.lease_terms

        def plan():
            finish_compactions(output)  # under the lease: no id keeps two rows
            if config.lease != "none":  # under the lease: a run still `running` in its summary has died
                reap_dead_runs(output, run.run_id)
            # Bucketed by id on the output's filesystem, so the driver never holds the manifest (plan.py).
            return prepare_plan(
                stream,
                output,
                plan_folder(output.uri, run.run_id),
                retry_failed=config.retry_failed,
                redo=redo,
                replacements=self.replacements,
            )

        try:
            self.layout = run.plan(TRANSCRIPTS_DIR, transcripts_terms, plan)
            self.models = resolve_job_models(config)  # the first is the run's `model` in the summary
            self.planned = plan_counts(self.layout)
            if self.planned["rows_to_do"]:  # a job that cannot fit the cluster stops now, never waits
                pipeline.plan_pools(config, pool_models(self.models), pipeline.ensure_ray().cluster_resources())
        except BaseException:  # a bad manifest or model: nothing was done, so nothing is left behind
            run.lease.release()
            if not output_existed:
                discard_own_records(output, run.run_id)
            discard_plan(output, run.run_id, output_created=not output_existed)
            raise
        if config.retry_failed and self.layout.committed.failed_files:
            # A crash after this leaves the failed ids with no row, so they are redone, never with two.
            drop_failed_rows(output, self.layout.committed.failed_files)
        log.info(
            "run %s: %d rows to do, %d already done, %d duplicates, from %s",
            run.run_id,
            self.planned["rows_to_do"],
            self.planned["rows_already_done"],
            self.planned["duplicates"],
            config.manifest or config.input,
        )
        schema = transcript_schema(self.layout.schema)
        self.writer: TranscriptWriter | DeltaWriter
        if delta:
            self.writer = DeltaWriter(output, run.run_id, schema, config.rows_per_file, config.commit_interval_s)
        else:
            self.writer = TranscriptWriter(
                output,
                run.run_id,
                schema,
                config.rows_per_file,
                config.commit_interval_s,
                before_commit=run.lease.check,
                replacements=self.replacements,
            )
        run.summary = self.summary

    def transcribe(self) -> None:
        """Stream the planned rows through the pipeline into the writer; then recover lost rows."""
        # The job's own progress line (run/progress.py) in place of Ray Data's operator bars.
        pipeline.ensure_ray().data.DataContext.get_current().enable_progress_bars = False
        self.metrics = pipeline.JobMetrics(self.bookkeeping.run_id)
        self.shown = Progress(self.planned["rows_to_do"]) if self.progress else None
        segments = self._dataset((self.layout, self.planned["rows_to_do"]))
        self.bookkeeping.stream(self._recordings(segments), self.writer, self.on_batch)
        if self.stats.rows_written + self.assembler.pending < self.planned["rows_to_do"]:
            self.recover()
        if self.shown is not None:
            self.shown.close(self.stats)
        if self.assembler.pending:  # never written half: the next run redoes them
            log.warning(
                "%d recordings did not receive all their segments; a re-run redoes them", self.assembler.pending
            )

    def recover(self) -> None:
        """Batches whose worker died twice were dropped (pipeline.MAX_LOST_BATCHES): find their rows by
        planning again against what is now committed, redo each recording alone, then error rows."""
        config, run_id = self.config, self.bookkeeping.run_id
        self.writer.commit_open()
        lost = _still_to_do(config, self.output, run_id, attempt=1)
        log.warning("%d rows lost with batches whose worker died; redoing them one by one", lost.num_rows)
        self.redone_alone = lost.num_rows
        if not lost.num_rows:
            return
        alone = self._dataset(lost, alone=True)
        self.bookkeeping.stream(self._recordings(alone), self.writer, self.on_batch)
        self.writer.commit_open()
        still_lost = _still_to_do(config, self.output, run_id, attempt=2)
        routed = routed_models(still_lost, self.models, pipeline.request_flags(config))
        crashed = crashed_rows(still_lost, self.writer.schema, *routed, run_id)
        if crashed.num_rows:
            crashed = self.identified(crashed)
            self.on_batch(crashed)
            self.writer.write(crashed)

    def _dataset(self, rows_to_do, alone: bool = False):
        return pipeline.build_dataset(
            rows_to_do, self.config, self.models, self.bookkeeping.run_id, alone=alone, crash_test=self.crash_test
        )

    def _recordings(self, segments):
        """The complete recordings' rows, as their last segments arrive from the Ray dataset; a run
        that finishes none for `stall_warning_s` says so, with what Ray has free."""
        with StallWarning(self.config.stall_warning_s) as stall:
            for batch in segments.iter_batches(batch_format="pyarrow", batch_size=None):
                recordings = self.assembler.add(batch)
                if recordings is not None:
                    stall.progress()
                    yield self.identified(recordings)

    def identified(self, recordings: pa.Table) -> pa.Table:
        # `language: auto` rows get their partition from their transcript (language_id.py), so this
        # runs before anything reads a row's language: subtitles, counts, the writer's partitions.
        identified = identify_recordings(
            recordings,
            detect_all=self.config.detect_language,
            threshold=self.config.language_threshold,
            tally=self.detection,
        )
        return mark_language_mismatch(identified)

    def on_batch(self, batch: pa.Table) -> None:
        config = self.config
        # Before the rows: once a row is committed its id is done, so its subtitles must exist.
        write_subtitles(batch, self.output, config.subtitles, self.bookkeeping.run_id)
        self.stats.add(batch)
        if self.metrics is not None:
            self.metrics.record(batch_counts(batch))
        if self.shown is not None:
            self.shown.update(self.stats)
        if "keywords_dropped" in batch.column_names:
            dropped = [count for count in batch.column("keywords_dropped").to_pylist() if count]
            self.keywords_dropped.update(rows=len(dropped), keywords=sum(dropped))
        if "reference" in batch.column_names:
            referenced = batch.filter(pc.is_valid(batch.column("reference")))
            if referenced.num_rows:
                self.with_reference.append(referenced.select(SCORED_COLUMNS))

    def summary(self, status: str) -> dict:
        run, stats, planned, layout = self.bookkeeping, self.stats, self.planned, self.layout
        wall_s = run.wall_s()
        first = self.models[0].ref
        return {
            **run.times(status),
            "manifest_files": layout.manifest_files,
            "rows_in": layout.rows_in,
            "duplicates": planned["duplicates"],
            "duplicates_differing": planned.get("duplicates_differing", 0),
            "ids_replaced": layout.ids_replaced,
            "shard_members_skipped": layout.shard_members_skipped,
            "rows_already_done": planned["rows_already_done"],
            "rows_to_do": planned["rows_to_do"],
            "rows_retried": planned["rows_retried"],
            **self._redo_counts(),
            "foreign_files": layout.committed.foreign_files,
            "rows_written": stats.rows_written,
            "rows_ok": stats.rows_ok,
            "rows_failed": stats.rows_failed,
            "failures_by_reason": dict(stats.failures_by_reason.most_common()),
            "rows_by_language": dict(sorted(stats.rows_by_language.items())),
            "language_detection": self.detection.as_dict() if self.detection.rows else None,
            "rows_incomplete": self.assembler.pending,
            "decoding": {language: dict(sorted(counts.items())) for language, counts in sorted(stats.decoding.items())},
            "inference": {model: figures.summary() for model, figures in self.assembler.inference.items()},
            "cascade": self.assembler.cascade(),
            "audio_s": round(stats.audio_s, 3),
            "audio_hours": round(stats.audio_s / 3600, 4),
            "wall_s": round(wall_s, 3),
            # RTFx: audio seconds per wall second (higher is faster). `real_time_factor` is the same
            # figure under its old, misleading name (a real-time factor is wall over audio): deprecated.
            "rtfx": round(stats.audio_s / wall_s, 3) if wall_s > 0 else None,
            "real_time_factor": round(stats.audio_s / wall_s, 3) if wall_s > 0 else None,
            "model": first.name,
            "model_revision": first.revision,
            "models": [{"model": m.ref.name, "model_revision": m.ref.revision} for m in self.models],
            "files": list(self.writer.committed),
            "rows_redone_alone": self.redone_alone,
            "keywords_dropped": dict(self.keywords_dropped),
            "config": self.config.public_dict(),
        }

    def _redo_counts(self) -> dict:
        """What the redo selections chose: committed rows each holds for, rows redone (those the
        manifest also lists), and how their new rows were committed (output/replace.py)."""
        if not self.layout.redo:
            return {}
        selections = self.layout.redo
        return {
            "rows_redone": self.planned["rows_redone"],
            "redo": {
                "selected": dict(zip(selections, self.layout.committed.rows_selected)),
                "planned": dict(zip(selections, self.planned["rows_redone_by"])),
                "rows_replaced": getattr(self.writer, "rows_replaced", 0) + self.replacements.rows_replaced,
                "rows_moved": self.replacements.rows_moved,
            },
        }


def check_output_format(config: JobConfig, output: OutputRoot) -> bool:
    """Whether the run writes a Delta table; an output whose transcripts are in the other format, or
    delta without the deltalake package, stops the run before any work (ConfigError)."""
    delta = is_delta(output)
    if config.output_format == "parquet":
        if delta:
            raise ConfigError(f"{config.output}: its transcripts are a Delta table; run with --format delta")
        return False
    try:
        import deltalake  # noqa: F401
    except ImportError:
        raise ConfigError("--format delta needs the deltalake package: pip install 'granite-batch[delta]'") from None
    if config.second_pass is not None:
        raise ConfigError("a second pass reads Parquet transcripts; it does not run over a Delta output yet")
    if not delta and list_dataset_files(*output.fs_and_path).ours:
        raise ConfigError(f"{config.output}: its transcripts are Parquet files; a Delta output needs a new output root")
    return True


def routed_models(rows: pa.Table, models: list[JobModel], flags) -> tuple[list[str], list[str | None]]:
    """The name and revision of the model each of `rows` goes to, routed as the job routes them
    (routing.route_table: the first model that serves it; the first model for a row none serves)."""
    refs = [model.ref for model in models]
    if len(refs) > 1:
        routed = route_table(rows, [(m.spec.model, m.profile) for m in models], flags)
        refs = [refs[i] for i in routed.column(ROUTE_COLUMN).to_pylist()]
    else:
        refs = refs * rows.num_rows
    return [ref.name for ref in refs], [ref.revision for ref in refs]


def _still_to_do(config: JobConfig, output: OutputRoot, run_id: str, attempt: int) -> pa.Table:
    """The manifest rows that still have no committed row, planned again (bounded like the first plan);
    used only when a run got back fewer rows than it planned, so the result is small."""
    stream = ManifestStream(
        config.manifest or config.input,
        Defaults.from_config(config),
        config.storage_options,
        listing=config.manifest is None,
    )
    layout = prepare_plan(stream, output, f"{plan_folder(output.uri, run_id)}-lost-{attempt}")
    tables = [todo for todo, _ in (plan_bucket(layout, b) for b in range(layout.buckets)) if todo.num_rows]
    return pa.concat_tables(tables, promote_options="permissive") if tables else layout.schema.empty_table()


def transcribe_files(
    paths: Iterable[str | Path | dict],
    output: str | Path,
    model: str | None = None,
    progress: bool = False,
    config_path: str | Path | None = None,
    **options,
) -> pa.Table:
    """Run a job over `paths` (recording paths or URIs, or manifest rows as dicts) into `output`
    and return those recordings' rows. `options` are job config fields (`language`, `task`,
    `target_language`, `generation={"max_new_tokens": 64}`, ...), over those of the job YAML at
    `config_path` when given (its manifest and output are not used). Recordings that already have a
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
        config = load_config(config_path, overrides)
        ids = read_manifest(config.manifest, Defaults.from_config(config), config.storage_options).table.column("id")
        run_job(config, progress=progress)
    table = results.load(config.output, storage_options=config.storage_options)
    return table.filter(pc.is_in(table.column("id"), value_set=ids.combine_chunks()))
