"""A job's output for notebooks and scripts: transcripts as Arrow, pandas or Ray, the run
summaries, and second-pass outputs joined to their transcripts. (To run a small job over a list
of files, see `drivers.transcribe_files`.)

    from granite_batch import results
    table = results.load("s3://archive/out", language="fr", task="asr")
"""

from __future__ import annotations

import posixpath
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from granite_batch.output.committed import committed_dataset
from granite_batch.output.delta import delta_dataset, is_delta
from granite_batch.output.summary import read_summaries
from granite_batch.schema import TRANSCRIPT_FIELDS, TRANSCRIPTS_DIR, second_pass_dir
from granite_batch.storage import OutputRoot

Output = str | Path | OutputRoot


def _root(output: Output, storage_options: dict | None) -> OutputRoot:
    """The output root these readers read: `output` itself when it is one, else made here once."""
    return output if isinstance(output, OutputRoot) else OutputRoot(str(output), storage_options)


def _one_or_many(value: str | Sequence[str] | None) -> list[str] | None:
    return None if value is None else [value] if isinstance(value, str) else list(value)


def _row_filter(language=None, task=None, run_id=None) -> pc.Expression | None:
    condition = None
    for name, value in (("language", language), ("task", task), ("run_id", run_id)):
        values = _one_or_many(value)
        if values is not None:
            term = pc.field(name).isin(values)
            condition = term if condition is None else condition & term
    return condition


def load(
    output_uri: Output,
    language: str | Sequence[str] | None = None,
    task: str | Sequence[str] | None = None,
    run_id: str | Sequence[str] | None = None,
    storage_options: dict | None = None,
    columns: list[str] | None = None,
) -> pa.Table:
    """Every committed transcript row under `output_uri` (optionally only these languages, tasks
    and runs), as one Arrow table with `language` as a plain string column, the contract's
    columns first, then passthrough columns. Files written by runs with different passthrough
    columns are read together (missing values are null; a passthrough column whose type changed
    between runs is read as text). Files under `transcripts/` that the job did not write are skipped,
    as every command skips them. An output with no transcripts gives an empty table with the
    contract's columns."""
    output = _root(output_uri, storage_options)
    if is_delta(output):  # the table's current version (output/delta.py)
        dataset = delta_dataset(output)
    else:
        dataset = committed_dataset(*output.fs_and_path, TRANSCRIPTS_DIR)
        if dataset is None:
            return pa.schema(TRANSCRIPT_FIELDS).empty_table()
    table = dataset.to_table(filter=_row_filter(language, task, run_id), columns=columns)
    contract = [f.name for f in TRANSCRIPT_FIELDS if f.name in table.column_names]
    return table.select(contract + [name for name in table.column_names if name not in contract])


def to_pandas(output_uri: Output, **filters):
    """`load(output_uri, **filters)` as a pandas DataFrame."""
    return load(output_uri, **filters).to_pandas()


def to_ray(
    output_uri: Output,
    language: str | Sequence[str] | None = None,
    task: str | Sequence[str] | None = None,
    run_id: str | Sequence[str] | None = None,
    storage_options: dict | None = None,
):
    """The transcripts as a lazy Ray Dataset, read in parallel by Ray with hive partitioning, so
    `language` is a column; the same rows as `load` with the same filters."""
    from granite_batch.pipeline import ensure_ray, transcripts_dataset

    output = _root(output_uri, storage_options)
    if is_delta(output):  # the table's current version, read here (not lazily)
        return ensure_ray().data.from_arrow(load(output, language, task, run_id))
    fs, root = output.fs_and_path
    dataset = committed_dataset(fs, root, TRANSCRIPTS_DIR)
    files, schema = (dataset.files, dataset.schema) if dataset else ([], pa.schema(TRANSCRIPT_FIELDS))
    return transcripts_dataset(
        fs,
        posixpath.join(root, TRANSCRIPTS_DIR),
        files,
        schema,
        _one_or_many(language),
        _row_filter(task=task, run_id=run_id),
    )


def runs(output_uri: Output, storage_options: dict | None = None) -> list[dict]:
    """Every run summary (`runs/<run_id>.json`) under the output root, oldest first."""
    return read_summaries(_root(output_uri, storage_options))


def second_pass_results(output_uri: Output, name: str, storage_options: dict | None = None) -> pa.Table:
    """Transcripts joined with their second-pass rows on `id`: every transcript column, then
    `output`, `chunked`, `second_pass_error`, `second_pass_model`, `second_pass_run_id`.

    Only ids that have a second-pass row; in the order of the transcripts.
    """
    output = _root(output_uri, storage_options)
    transcripts = load(output)
    dataset = committed_dataset(*output.fs_and_path, second_pass_dir(name))
    if transcripts.num_rows == 0 or dataset is None:
        raise FileNotFoundError(f"no transcripts or no second pass {name!r} under {output.uri}")
    second = dataset.to_table(columns=["id", "output", "chunked", "error", "model", "run_id"])
    positions = pc.index_in(transcripts.column("id"), value_set=second.column("id"))
    has_row = pc.is_valid(positions)
    joined = transcripts.filter(has_row)
    matched = second.take(positions.filter(has_row))
    for column, as_name in [
        ("output", "output"),
        ("chunked", "chunked"),
        ("error", "second_pass_error"),
        ("model", "second_pass_model"),
        ("run_id", "second_pass_run_id"),
    ]:
        joined = joined.append_column(as_name, matched.column(column))
    return joined
