"""The drivers: run a transcription job, run a second pass, transcribe a few files, evaluate an output.

A driver plans what is left to do, iterates a Ray Data graph from pipeline.py, writes what comes
out through output.py and keeps a run summary. The two long-running drivers share one skeleton
(`_Run`): a run id that is new in its output, a summary written when the run starts, after every
committed file and at the end, with status `failed` and the reason when the run stops on an error.
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from granite_batch import pipeline, results
from granite_batch.config import ConfigError, JobConfig, SecondPassOptions, load_config
from granite_batch.language_id import DetectionTally, identify_recordings
from granite_batch.language_model import resolve_language_model
from granite_batch.lease import LeaseTerms, NoLease, discard_own_records, take_lease
from granite_batch.manifest import Defaults, ManifestStream, read_manifest
from granite_batch.engines import model_profile
from granite_batch.model import first_line, resolve_model
from granite_batch.plan import discard_plan, plan_bucket, plan_counts, plan_folder, prepare_plan
from granite_batch.output import (
    EVAL_DIR,
    RUNS_DIR,
    TRANSCRIPTS_DIR,
    SECOND_PASS_SCHEMA,
    RunStats,
    TranscriptWriter,
    drop_failed_rows,
    drop_rows,
    error_reason,
    read_committed,
    second_pass_dir,
    transcript_schema,
    write_summary,
)
from granite_batch.preflight import check_output_root, check_run_id_unused
from granite_batch.recovery import crashed_rows
from granite_batch.routing import ROUTE_COLUMN, route_table
from granite_batch.second_pass_prompts import Prompter, load_template
from granite_batch.storage import filesystem, write_json
from granite_batch.subtitles import write_subtitles
from granite_batch.transcribe import RecordingAssembler

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


class _Run:
    """One run's bookkeeping, the same for every driver: its summary file and the batch loop.

    `summary(status)` builds the summary dict from the driver's own counters; it is written with
    `running` when the run starts and after every file it commits, then with the final status. A
    run stopped by an error writes `failed` with the error's first line before the error goes on.
    """

    def __init__(self, output_uri: str, runs_dir: str, run_id: str | None, storage_options: dict | None):
        self.output_uri = output_uri
        self.runs_dir = runs_dir
        self.storage_options = storage_options
        self.run_id = run_id or new_run_id()
        self.started_at = datetime.now(timezone.utc)
        self.clock = time.monotonic()
        self.summary: Callable[[str], dict] | None = None
        self.last: dict = {}
        self.lease = NoLease(output_uri)  # the dataset's lease once taken; released when the run ends
        self._refuse_existing_run_id()

    def _refuse_existing_run_id(self) -> None:
        fs, root = filesystem(self.output_uri, self.storage_options)
        if fs.exists(posixpath.join(root, self.runs_dir, f"{self.run_id}.json")):
            # Its files are named after the run id: a second run of that name would replace them.
            raise ConfigError(f"run id {self.run_id!r} already exists in {self.output_uri}; pick another --run-id "
                              "(or leave it out for a new one)")

    def wall_s(self) -> float:
        return time.monotonic() - self.clock

    def times(self, status: str) -> dict:
        return {"run_id": self.run_id, "status": status, "started_at": self.started_at.isoformat(),
                "finished_at": datetime.now(timezone.utc).isoformat() if status != "running" else None}

    def write(self, status: str, **extra) -> str:
        """Write the summary with `status` (and `extra` fields); it stays in `self.last`."""
        self.last = {**self.summary(status), **extra}
        return write_summary(self.output_uri, self.run_id, self.last, self.storage_options, runs_dir=self.runs_dir)

    def stream(self, batches: Iterable[pa.Table], writer: TranscriptWriter,
               on_batch: Callable[[pa.Table], None]) -> None:
        """Write every batch (after `on_batch` has seen it); the summary follows each commit."""
        for batch in batches:
            on_batch(batch)
            files_before = len(writer.committed)
            writer.write(batch)
            if len(writer.committed) != files_before:
                self.write("running")

    def __enter__(self) -> "_Run":
        # A summary exists from the start, so a run killed at any moment still shows what it did.
        self.write("running")
        return self

    def __exit__(self, kind, error, traceback) -> None:
        try:
            if error is not None and self.summary is not None:
                try:
                    self.write("failed", error=f"{kind.__name__}: {first_line(error)}")
                except Exception:  # the output itself may be what failed; the original error matters more
                    log.warning("could not record the failure in the run summary", exc_info=True)
        finally:
            self.lease.release()

    def plan(self, dataset_dir: str, terms: LeaseTerms, planner: Callable[[], object]):
        """Take the lease on the dataset this run writes (held until the run ends; waits for or
        raises LeaseHeld naming another holder), then plan what is left to do: `planner()`."""
        self.lease = take_lease(self.output_uri, dataset_dir, self.run_id, self.storage_options, terms)
        # The run starts now: time spent waiting for the lease is not its wall time.
        self.started_at, self.clock = datetime.now(timezone.utc), time.monotonic()
        try:
            self._refuse_existing_run_id()  # a run of the same id may have held the lease meanwhile
            return planner()
        except BaseException:
            self.lease.release()
            raise


def _ids_to_skip(output_uri: str, dataset_dir: str, retry_failed: bool, storage_options: dict | None) -> pa.Array:
    """Ids that already have a row in the dataset (with `retry_failed`, only a successful one).

    With `retry_failed` the files holding failed rows are first rewritten without them: a crash
    after that leaves those ids with no row, so they are redone, never with two rows.
    """
    committed = read_committed(output_uri, storage_options, dataset_dir=dataset_dir)
    if retry_failed and committed.failed:
        drop_rows(output_uri, committed.failed, storage_options)
    return committed.ids(include_failed=not retry_failed)


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
    stream = ManifestStream(config.manifest or config.input, Defaults.from_config(config), config.storage_options,
                            listing=config.manifest is None)
    fs, root = filesystem(config.output, config.storage_options)
    output_existed = fs.exists(root)
    lease_terms = LeaseTerms(config.lease, config.lease_expiry_s, config.lease_wait_s)

    def plan():
        # Bucketed by id on the output's filesystem, so the driver never holds the manifest (plan.py).
        return prepare_plan(stream, config.output, plan_folder(config.output, run.run_id), config.storage_options,
                            retry_failed=config.retry_failed)

    try:
        layout = run.plan(TRANSCRIPTS_DIR, lease_terms, plan)
        # Every model of the job, in routing order; the first is the run's `model` in the summary.
        model_refs = [resolve_model(spec.model, spec.revision, config.trust_remote_code)
                      for spec in config.model_specs()]
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
    log.info("run %s: %d rows to do, %d already done, %d duplicates, from %s", run.run_id, planned["rows_to_do"],
             planned["rows_already_done"], planned["duplicates"], config.manifest or config.input)

    stats = RunStats()
    detection = DetectionTally(config.language_threshold)

    def identified(recordings: pa.Table) -> pa.Table:
        # `language: auto` rows get their partition from their transcript (language_id.py), so this
        # runs before anything reads a row's language: subtitles, counts, the writer's partitions.
        return identify_recordings(recordings, detect_all=config.detect_language,
                                   threshold=config.language_threshold, tally=detection)

    assembler: RecordingAssembler | None = None
    scored_columns = ["id", "language", "task", "target_language", "text", "error", "reference"]
    with_reference: list[pa.Table] = []  # the small part of each batch that quality figures need
    redone_alone = 0
    keywords_dropped = Counter()
    writer = TranscriptWriter(config.output, run.run_id, transcript_schema(layout.schema),
                              config.storage_options, config.rows_per_file, config.commit_interval_s,
                              before_commit=run.lease.check)

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
            "inference": {model: figures.summary() for model, figures in assembler.inference.items()} if assembler else {},
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
                    crashed = crashed_rows(still_lost, writer.schema, *_routed_models(still_lost, config, model_refs),
                                           run.run_id)
                    if crashed.num_rows:
                        crashed = identified(crashed)
                        on_batch(crashed)
                        writer.write(crashed)
            if assembler.pending:  # never written half: the next run redoes them
                log.warning("%d recordings did not receive all their segments; a re-run redoes them",
                            assembler.pending)
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
    stream = ManifestStream(config.manifest or config.input, Defaults.from_config(config), config.storage_options,
                            listing=config.manifest is None)
    layout = prepare_plan(stream, config.output, f"{plan_folder(config.output, run_id)}-lost-{attempt}",
                          config.storage_options)
    tables = [todo for todo, _ in (plan_bucket(layout, b) for b in range(layout.buckets)) if todo.num_rows]
    return pa.concat_tables(tables, promote_options="permissive") if tables else layout.schema.empty_table()


def _recordings(segments, assembler: RecordingAssembler, finish: Callable[[pa.Table], pa.Table]):
    """The complete recordings' rows, as their last segments arrive from the Ray dataset, through `finish`."""
    for batch in segments.iter_batches(batch_format="pyarrow", batch_size=None):
        recordings = assembler.add(batch)
        if recordings is not None:
            yield finish(recordings)


def run_second_pass(output_uri: str, options: SecondPassOptions, storage_options: dict | None = None,
                    run_id: str | None = None, progress: bool = True,
                    lease_terms: LeaseTerms = LeaseTerms()) -> RunResult:
    """Run the second pass over the committed transcripts of `output_uri`.

    Raises ConfigError (bad template, no transcripts, a context too small for the template) or
    ModelLoadError before any work, LeaseHeld when another run holds its dataset. Ids already in the
    dataset are skipped.
    """
    name = options.dataset_name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise ConfigError(f"second_pass.name: {name!r} is not a valid dataset name; pass --name")
    dataset_dir = second_pass_dir(name)
    run = _Run(output_uri, posixpath.join(dataset_dir, "_runs"), run_id, storage_options)
    template_source = load_template(options)
    transcripts = results.load(output_uri, storage_options=storage_options,
                               columns=["id", "language", "text", "error"])
    if transcripts.num_rows == 0:
        raise ConfigError(f"no transcripts under {output_uri}: run `granite-batch run` first")
    model_ref, tokenizer, context_tokens = resolve_language_model(options)
    prompter = Prompter(tokenizer, template_source, options.question)
    budget = context_tokens - options.max_new_tokens
    room = budget - max(prompter.overhead(stage) for stage in ("whole", "map", "reduce"))
    # The reduce step must fit at least two notes of max_new_tokens each, or it could not shrink them.
    if room < 2 * (options.max_new_tokens + 8):
        raise ConfigError(
            f"second_pass: a context of {context_tokens} tokens leaves {room} for the transcript after the "
            f"template and {options.max_new_tokens} new tokens; lower max_new_tokens (or raise context_tokens)"
        )

    failed = pc.is_valid(transcripts.column("error"))
    empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(pc.fill_null(transcripts.column("text"), "")), ""), True)
    usable = transcripts.filter(pc.and_(pc.invert(failed), pc.invert(empty)))
    done_ids = run.plan(dataset_dir, lease_terms,
                        lambda: _ids_to_skip(output_uri, dataset_dir, options.retry_failed, storage_options))
    todo = usable.filter(pc.invert(pc.is_in(usable.column("id"), value_set=done_ids)))
    todo = todo.select(["id", "language", "text"])
    log.info("second pass %s (run %s): %d transcripts to do, %d already done", name, run.run_id, todo.num_rows,
             usable.num_rows - todo.num_rows)

    writer = TranscriptWriter(output_uri, run.run_id, SECOND_PASS_SCHEMA, storage_options, dataset_dir=dataset_dir,
                              before_commit=run.lease.check)
    counts: Counter = Counter()
    failures: Counter = Counter()

    def summary(status: str) -> dict:
        return {
            **run.times(status), "name": name,
            "transcripts": transcripts.num_rows,
            "skipped_failed": pc.sum(failed).as_py() or 0,
            "skipped_empty": pc.sum(pc.and_(pc.invert(failed), empty)).as_py() or 0,
            "rows_already_done": usable.num_rows - todo.num_rows,
            "rows_to_do": todo.num_rows,
            "rows_written": counts["written"], "rows_ok": counts["ok"], "rows_failed": counts["failed"],
            "rows_chunked": counts["chunked"],
            "failures_by_reason": dict(failures.most_common()),
            "context_tokens": context_tokens,
            "wall_s": round(run.wall_s(), 3),
            "model": model_ref.name, "model_revision": model_ref.revision,
            "files": list(writer.committed),
            "options": options.model_dump(mode="json"),
        }

    def on_batch(batch: pa.Table) -> None:
        errors = batch.column("error").to_pylist()
        counts["written"] += batch.num_rows
        counts["failed"] += sum(e is not None for e in errors)
        counts["ok"] += sum(e is None for e in errors)
        counts["chunked"] += sum(batch.column("chunked").to_pylist())
        failures.update(error_reason(e) for e in errors if e is not None)

    run.summary = summary
    with run:
        if todo.num_rows:
            pipeline.ensure_ray().data.DataContext.get_current().enable_progress_bars = progress
            ds = pipeline.build_second_pass_dataset(todo, options, template_source, model_ref, run.run_id)
            run.stream(ds.iter_batches(batch_format="pyarrow", batch_size=None), writer, on_batch)
        writer.close()
        path = run.write("succeeded")
    return RunResult(run.run_id, run.last, path, list(writer.committed))


def transcribe_files(paths: Iterable[str | Path | dict], output: str | Path, model: str | None = None,
                     progress: bool = False, **options) -> pa.Table:
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
        manifest_path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                                 encoding="utf-8")
        overrides = {"manifest": str(manifest_path), "output": str(output), "model": model, **options}
        config = load_config(overrides=overrides)
        ids = read_manifest(config.manifest, Defaults.from_config(config), config.storage_options).table.column("id")
        run_job(config, progress=progress)
    table = results.load(config.output, storage_options=config.storage_options)
    return table.filter(pc.is_in(table.column("id"), value_set=ids.combine_chunks()))


def evaluate_output(output_uri: str, run_id: str | None = None, language: str | None = None,
                    task: str | None = None, storage_options: dict | None = None) -> tuple[dict, str]:
    """Score the rows of one run of an output root (the newest when `run_id` is None; every row
    when it is "all"), optionally of one language and task, and write the report to
    `OUTPUT/eval/<run_id>.json` (`<run_id>.language=L.task=T.json` when filtered).
    Returns (report, its path). Raises ValueError when the root has no run to score."""
    from granite_batch.evaluate import score_table

    if run_id != "all":
        known = [summary["run_id"] for summary in results.runs(output_uri, storage_options)]
        if not known:
            raise ValueError(f"no runs under {output_uri}/runs; give --run all to score every row")
        if run_id is not None and run_id not in known:
            raise ValueError(f"no run {run_id} under {output_uri}/runs; newest: {known[-1]}")
        run_id = run_id or known[-1]
    table = results.load(output_uri, language=language, task=task,
                         run_id=None if run_id == "all" else run_id, storage_options=storage_options)
    filters = {"language": language, "task": task}
    report = {
        "run_id": run_id,
        "output": output_uri,
        "filters": filters,
        "evaluated_at": datetime.now(timezone.utc).isoformat(),
        "models": sorted(set(table.column("model").to_pylist())) if "model" in table.column_names else [],
        **score_table(table),
    }
    name = run_id + "".join(f".{key}={value}" for key, value in filters.items() if value)
    return report, write_json(output_uri, posixpath.join(EVAL_DIR, f"{name}.json"), report, storage_options)
