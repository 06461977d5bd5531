"""The second-pass driver: a language model over committed transcripts."""

from __future__ import annotations

import logging
import posixpath
import re
from collections import Counter

import pyarrow as pa
import pyarrow.compute as pc

from granite_batch import pipeline, results
from granite_batch.config import ConfigError, SecondPassOptions
from granite_batch.output.committed import drop_rows, read_committed
from granite_batch.output.writer import TranscriptWriter
from granite_batch.run.bookkeeping import RunResult, _Run
from granite_batch.run.lease import LeaseTerms
from granite_batch.schema import (
    SECOND_PASS_SCHEMA,
    error_reason,
    second_pass_dir,
)
from granite_batch.second_pass.language_model import resolve_language_model
from granite_batch.second_pass.prompts import Prompter, load_template
from granite_batch.storage import OutputRoot

log = logging.getLogger(__name__)


def _ids_to_skip(output: OutputRoot, dataset_dir: str, retry_failed: bool) -> pa.Array:
    """Ids that already have a row in the dataset (with `retry_failed`, only a successful one).

    With `retry_failed` the files holding failed rows are first rewritten without them: a crash
    after that leaves those ids with no row, so they are redone, never with two rows.
    """
    committed = read_committed(output, dataset_dir=dataset_dir)
    if retry_failed and committed.failed:
        drop_rows(output, committed.failed)
    return committed.ids(include_failed=not retry_failed)


def run_second_pass(
    output: OutputRoot,
    options: SecondPassOptions,
    run_id: str | None = None,
    progress: bool = True,
    lease_terms: LeaseTerms = LeaseTerms(),
) -> RunResult:
    """Run the second pass over the committed transcripts of `output`.

    Raises ConfigError (bad template, no transcripts, a context too small for the template) or
    ModelLoadError before any work, LeaseHeld when another run holds its dataset. Ids already in the
    dataset are skipped.
    """
    name = options.dataset_name
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", name):
        raise ConfigError(f"second_pass.name: {name!r} is not a valid dataset name; pass --name")
    dataset_dir = second_pass_dir(name)
    run = _Run(output, posixpath.join(dataset_dir, "_runs"), run_id)
    template_source = load_template(options)
    transcripts = results.load(output, columns=["id", "language", "text", "error"])
    if transcripts.num_rows == 0:
        raise ConfigError(f"no transcripts under {output.uri}: run `granite-batch run` first")
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
    done_ids = run.plan(dataset_dir, lease_terms, lambda: _ids_to_skip(output, dataset_dir, options.retry_failed))
    todo = usable.filter(pc.invert(pc.is_in(usable.column("id"), value_set=done_ids)))
    todo = todo.select(["id", "language", "text"])
    log.info(
        "second pass %s (run %s): %d transcripts to do, %d already done",
        name,
        run.run_id,
        todo.num_rows,
        usable.num_rows - todo.num_rows,
    )

    writer = TranscriptWriter(
        output,
        run.run_id,
        SECOND_PASS_SCHEMA,
        dataset_dir=dataset_dir,
        before_commit=run.lease.check,
    )
    counts: Counter = Counter()
    failures: Counter = Counter()

    def summary(status: str) -> dict:
        return {
            **run.times(status),
            "name": name,
            "transcripts": transcripts.num_rows,
            "skipped_failed": pc.sum(failed).as_py() or 0,
            "skipped_empty": pc.sum(pc.and_(pc.invert(failed), empty)).as_py() or 0,
            "rows_already_done": usable.num_rows - todo.num_rows,
            "rows_to_do": todo.num_rows,
            "rows_written": counts["written"],
            "rows_ok": counts["ok"],
            "rows_failed": counts["failed"],
            "rows_chunked": counts["chunked"],
            "failures_by_reason": dict(failures.most_common()),
            "context_tokens": context_tokens,
            "wall_s": round(run.wall_s(), 3),
            "model": model_ref.name,
            "model_revision": model_ref.revision,
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
