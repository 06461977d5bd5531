"""The output schema, the Parquet writer for the transcripts dataset, and the run summary.

Layout under the output root (any fsspec URI):

    transcripts/language=<lang>/part-<run_id>-<n>.parquet   hive-partitioned; `language` lives in the path
    runs/<run_id>.json                                     one summary per run
    second_pass/<name>/language=<lang>/part-<run_id>-<n>.parquet, second_pass/<name>/_runs/<run_id>.json

Files are written under `_staging/<run_id>/` and moved into `transcripts/` only once complete, so
readers never see a partial file. Reading back, a file is ours by that name alone: anything else
under a dataset folder is foreign, skipped with a warning and reported (`list_dataset_files`).
"""

from __future__ import annotations

import json
import logging
import posixpath
import re
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from granite_batch.storage import filesystem, uri_of, write_json

log = logging.getLogger(__name__)

# One word of a segment (alignment.py): seconds from the recording's start, its text, and the mean
# CTC posterior probability of its aligned letters (null where none was aligned).
WORD_TYPE = pa.struct([("start", pa.float64()), ("end", pa.float64()), ("text", pa.string()),
                       ("confidence", pa.float64())])
# One speech segment of a recording (../shared/CONTRACT.md, `segments`): seconds from the recording's
# start; `truncated` when decoding stopped at the token budget; `avg_logprob` the mean scaled log-probability
# of its tokens (null where no language model scored them); `words` with word timestamps on; `speaker` and
# `channel` stay null until something computes them (speaker labels, split channels).
SEGMENT_TYPE = pa.struct([
    ("start", pa.float64()), ("end", pa.float64()), ("text", pa.string()), ("truncated", pa.bool_()),
    ("avg_logprob", pa.float64()), ("speaker", pa.string()), ("words", pa.list_(WORD_TYPE)),
    ("channel", pa.int32()),
])

# The contract's columns, in order; passthrough columns follow them.
TRANSCRIPT_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("audio", pa.string(), nullable=False),
    pa.field("language", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("target_language", pa.string()),
    pa.field("text", pa.string()),
    pa.field("segments", pa.list_(SEGMENT_TYPE)),
    pa.field("language_detected", pa.string()),
    pa.field("duration_s", pa.float64()),
    pa.field("error", pa.string()),
    pa.field("model", pa.string(), nullable=False),
    pa.field("model_revision", pa.string()),
    pa.field("run_id", pa.string(), nullable=False),
]
TRANSCRIPTS_DIR = "transcripts"
RUNS_DIR = "runs"
STAGING_DIR = "_staging"
SECOND_PASS_DIR = "second_pass"
EVAL_DIR = "eval"

# A second pass's dataset: OUTPUT/second_pass/<name>/, partitioned by language like the transcripts.
SECOND_PASS_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("language", pa.string(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("output", pa.string()),
    pa.field("model", pa.string(), nullable=False),
    pa.field("model_revision", pa.string()),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("chunked", pa.bool_(), nullable=False),
]
SECOND_PASS_SCHEMA = pa.schema(SECOND_PASS_FIELDS)


def second_pass_dir(name: str) -> str:
    """The folder of second pass `name`, relative to the output root."""
    return posixpath.join(SECOND_PASS_DIR, name)


def transcript_schema(passthrough: pa.Schema | None = None) -> pa.Schema:
    """The schema of transcript rows: the contract's columns, then the manifest's extra columns.

    `keywords` is an input of the request (and part of the default id), not a passthrough column;
    nor are the row's embedded audio bytes and its `channels` mode.
    """
    fields = list(TRANSCRIPT_FIELDS)
    names = {f.name for f in fields} | {"keywords", "audio_bytes", "channels"}
    for extra in passthrough or []:
        if extra.name not in names:
            fields.append(extra)
    return pa.schema(fields)


def file_schema(schema: pa.Schema) -> pa.Schema:
    """What goes inside each Parquet file: everything but the partition column."""
    return schema.remove(schema.get_field_index("language"))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast `table`'s columns into `schema`'s order and types; a nullable column the
    table lacks (e.g. `language_detected` when detection is off) is all nulls."""
    names = set(table.column_names)
    return pa.Table.from_arrays(
        [table.column(f.name).cast(f.type) if f.name in names or not f.nullable else pa.nulls(table.num_rows, f.type)
         for f in schema], schema=schema)


def error_reason(error: str) -> str:
    """The reason class of an error string ("decode failed: ..." -> "decode failed")."""
    return error.split(":", 1)[0].strip()


class TranscriptWriter:
    """Streams transcript rows into a modest number of Parquet files per language partition.

    A file is closed and moved into place after `rows_per_file` rows, after `commit_interval_s`
    seconds (so a long run makes its progress durable), and at `close()`.
    """

    def __init__(self, output_uri: str, run_id: str, schema: pa.Schema, storage_options: dict | None = None,
                 rows_per_file: int = 200_000, commit_interval_s: float = 600.0,
                 dataset_dir: str = TRANSCRIPTS_DIR, before_commit: Callable[[], None] | None = None):
        self.fs, self.root = filesystem(output_uri, storage_options)
        self.before_commit = before_commit  # raises to stop a commit, e.g. a lease check
        self.dataset_dir = dataset_dir  # relative to the output root; other datasets (second_pass/<name>) too
        self.run_id = run_id
        self.schema = schema
        self.rows_per_file = rows_per_file
        self.commit_interval_s = commit_interval_s
        self.committed: list[str] = []
        self._open: dict[str, _OpenFile] = {}
        self._sequence = 0

    def write(self, table: pa.Table) -> None:
        table = conform(table, self.schema)
        languages = table.column("language")
        for language in pc.unique(languages).to_pylist():
            part = table.filter(pc.equal(languages, language)).drop_columns(["language"])
            handle = self._open.get(language) or self._start(language)
            handle.writer.write_table(part)
            handle.rows += part.num_rows
            if handle.rows >= self.rows_per_file:
                self._commit(language)
        now = time.monotonic()
        for language in [lang for lang, h in self._open.items() if now - h.opened_at >= self.commit_interval_s]:
            self._commit(language)

    def commit_open(self) -> None:
        """Commit every open file now (the writer goes on: later rows open new files)."""
        for language in list(self._open):
            self._commit(language)

    def close(self) -> list[str]:
        """Commit every open file; return the paths of all files this writer committed."""
        self.commit_open()
        staging = posixpath.join(self.root, STAGING_DIR, self.run_id)
        if self.fs.exists(staging):
            self.fs.rm(staging, recursive=True)
        return self.committed

    def _start(self, language: str) -> "_OpenFile":
        self._sequence += 1
        name = f"part-{self.run_id}-{self._sequence:05d}.parquet"
        relative = posixpath.join(f"language={language}", name)
        staged = posixpath.join(self.root, STAGING_DIR, self.run_id, relative)
        self.fs.makedirs(posixpath.dirname(staged), exist_ok=True)
        stream = self.fs.open(staged, "wb")
        writer = pq.ParquetWriter(stream, file_schema(self.schema), compression="zstd")
        handle = _OpenFile(staged, posixpath.join(self.root, self.dataset_dir, relative), stream, writer)
        self._open[language] = handle
        return handle

    def _commit(self, language: str) -> None:
        handle = self._open.pop(language)
        handle.writer.close()
        handle.stream.close()
        self.fs.makedirs(posixpath.dirname(handle.final), exist_ok=True)
        if self.before_commit is not None:
            self.before_commit()  # last moment: the file stays staged if this raises
        self.fs.mv(handle.staged, handle.final)
        self.committed.append(uri_of(self.fs, handle.final))
        log.info("committed %s (%d rows)", handle.final, handle.rows)


# Our own files, by name: anything else under a dataset folder (an older job's file, a README) is foreign.
OWN_FILE = re.compile(r"language=(?P<language>[^/]+)/part-(?P<run_id>.+)-(?P<sequence>\d{5,})\.parquet")
COMMITTED_COLUMNS = ("id", "error")


class OutputError(RuntimeError):
    """A file the job wrote under the output root cannot be read back; the message names the file."""


@dataclass
class DatasetFiles:
    """The files under a dataset folder of the output root: ours (by name) and foreign ones."""

    ours: list[str]  # paths within the output's filesystem
    foreign: list[str]  # URIs, skipped with a warning


def list_dataset_files(fs, root: str, dataset_dir: str = TRANSCRIPTS_DIR) -> DatasetFiles:
    """Sort the files under `root/dataset_dir` into ours (`language=<lang>/part-<run_id>-<n>.parquet`)
    and foreign ones, which are logged by name and otherwise left alone."""
    base = posixpath.join(root, dataset_dir)
    ours: list[str] = []
    foreign: list[str] = []
    if fs.exists(base):
        for path in sorted(fs.find(base)):
            relative = posixpath.relpath(path, base)
            (ours if OWN_FILE.fullmatch(relative) else foreign).append(path)
    if foreign:
        shown = ", ".join(uri_of(fs, p) for p in foreign[:10]) + (" ..." if len(foreign) > 10 else "")
        log.warning("skipping %d file(s) under %s not written by granite-batch: %s", len(foreign),
                    uri_of(fs, base), shown)
    return DatasetFiles(ours, [uri_of(fs, p) for p in foreign])


def iter_committed_batches(fs, paths: list[str], columns: tuple[str, ...] = COMMITTED_COLUMNS,
                           batch_rows: int = 262_144):
    """Yield (path, table of `columns`) for each of our committed files, a few batches per file.

    A file with our name that cannot be read, or lacks one of `columns`, raises OutputError naming it.
    """
    for path in paths:
        try:
            with fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                missing = [c for c in columns if c not in parquet.schema_arrow.names]
                if missing:
                    raise OutputError(f"{uri_of(fs, path)}: committed file lacks column {missing[0]!r}; "
                                      "move it out of the output root or repair it")
                for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(columns)):
                    yield path, pa.Table.from_batches([batch])
        except (pa.ArrowInvalid, OSError) as exc:
            raise OutputError(f"{uri_of(fs, path)}: committed file is not readable Parquet ({exc})") from None


@dataclass
class Committed:
    """What a previous run left in the output: ids with a successful row, and failed rows by file."""

    ok_ids: pa.ChunkedArray
    failed: dict[str, list[str]]
    failures_by_reason: Counter = field(default_factory=Counter)
    foreign_files: list[str] = field(default_factory=list)

    @property
    def failed_ids(self) -> list[str]:
        return [row_id for ids in self.failed.values() for row_id in ids]

    def ids(self, include_failed: bool = True) -> pa.Array:
        """Ids that have a row (optionally only a successful one), as one Arrow array."""
        chunks = list(self.ok_ids.chunks)
        if include_failed:
            chunks.append(pa.array(self.failed_ids, pa.string()))
        return pa.concat_arrays(chunks) if chunks else pa.array([], pa.string())


def failure_reasons(errors) -> Counter:
    """Failed rows per reason class, counted with Arrow compute (no Python object per row)."""
    errors = errors.drop_null() if hasattr(errors, "drop_null") else errors
    if len(errors) == 0:
        return Counter()
    reasons = pc.utf8_trim_whitespace(pc.list_element(pc.split_pattern(errors, ":", max_splits=1), 0))
    counts = pc.value_counts(reasons)
    return Counter(dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist())))


def read_committed(output_uri: str, storage_options: dict | None = None,
                   dataset_dir: str = TRANSCRIPTS_DIR) -> Committed:
    """Scan the committed rows of a dataset under the output root (only `id` and `error`), one file
    at a time: the transcripts, or another dataset such as a second pass's. Holds every id in memory;
    plan.py plans and counts without doing so."""
    fs, root = filesystem(output_uri, storage_options)
    files = list_dataset_files(fs, root, dataset_dir)
    ok: list[pa.Array] = []
    failed: dict[str, list[str]] = {}
    reasons: Counter = Counter()
    for path, table in iter_committed_batches(fs, files.ours):
        is_ok = pc.is_null(table.column("error"))
        ok.append(table.column("id").filter(is_ok).combine_chunks())
        bad = table.filter(pc.invert(is_ok))
        if bad.num_rows:
            failed.setdefault(path, []).extend(bad.column("id").to_pylist())
            reasons.update(failure_reasons(bad.column("error")))
    return Committed(pa.chunked_array(ok, type=pa.string()), failed, reasons, files.foreign)


def _rewrite_without(fs, root: str, path: str, drop) -> None:
    """Replace one file atomically by its rows where `drop(table)` is false, or remove it if none is left."""
    with fs.open(path, "rb") as handle:
        table = pq.read_table(handle)
    kept = table.filter(pc.invert(drop(table)))
    if kept.num_rows == table.num_rows:
        return
    if kept.num_rows == 0:
        fs.rm(path)
        return
    staged = posixpath.join(root, STAGING_DIR, "rewrite", posixpath.basename(path))
    fs.makedirs(posixpath.dirname(staged), exist_ok=True)
    with fs.open(staged, "wb") as handle:
        pq.write_table(kept, handle, compression="zstd")
    fs.mv(staged, path)


def drop_rows(output_uri: str, ids_by_file: dict[str, list[str]], storage_options: dict | None = None) -> None:
    """Rewrite each file without the given ids (atomically replacing it), or remove it if nothing is left.

    Used before failed rows are retried: a crash after this leaves those ids with no row, so the
    next run redoes them; it never leaves two rows for one id.
    """
    fs, root = filesystem(output_uri, storage_options)
    for path, ids in ids_by_file.items():
        value_set = pa.array(ids, pa.string())
        _rewrite_without(fs, root, path, lambda table: pc.is_in(table.column("id"), value_set=value_set))


def drop_failed_rows(output_uri: str, paths: list[str], storage_options: dict | None = None) -> None:
    """Rewrite each of our files in `paths` without its rows that have an `error`, as drop_rows does,
    without holding their ids (plan.py's `PlanLayout.failed_files` lists the files)."""
    fs, root = filesystem(output_uri, storage_options)
    for path in paths:
        _rewrite_without(fs, root, path, lambda table: pc.is_valid(table.column("error")))


def read_summaries(output_uri: str, storage_options: dict | None = None) -> list[dict]:
    """Every run summary under the output root, oldest first."""
    fs, root = filesystem(output_uri, storage_options)
    folder = posixpath.join(root, RUNS_DIR)
    if not fs.exists(folder):
        return []
    summaries = []
    for path in sorted(fs.glob(posixpath.join(folder, "*.json"))):
        with fs.open(path, "r") as handle:
            summaries.append(json.load(handle))
    return sorted(summaries, key=lambda s: s.get("started_at", ""))


@dataclass
class _OpenFile:
    staged: str
    final: str
    stream: object
    writer: pq.ParquetWriter
    rows: int = 0
    opened_at: float = field(default_factory=time.monotonic)


@dataclass
class RunStats:
    """Counts over the rows a run wrote, for the summary and the progress line."""

    rows_written: int = 0
    rows_ok: int = 0
    rows_failed: int = 0
    audio_s: float = 0.0
    failures_by_reason: Counter = field(default_factory=Counter)
    rows_by_language: Counter = field(default_factory=Counter)
    decoding: dict = field(default_factory=dict)  # language -> Counter of what decided each row

    def add(self, table: pa.Table) -> None:
        errors = table.column("error").to_pylist()
        durations = table.column("duration_s").to_pylist()
        self.rows_written += table.num_rows
        for error, duration in zip(errors, durations):
            if error is None:
                self.rows_ok += 1
            else:
                self.rows_failed += 1
                self.failures_by_reason[error_reason(error)] += 1
            self.audio_s += duration or 0.0
        self.rows_by_language.update(table.column("language").to_pylist())
        if "decoded_by" in table.column_names:
            for language, decided in zip(table.column("language").to_pylist(), table.column("decoded_by").to_pylist()):
                if decided is not None:
                    self.decoding.setdefault(language, Counter())[decided] += 1


def write_summary(output_uri: str, run_id: str, summary: dict, storage_options: dict | None = None,
                  runs_dir: str = RUNS_DIR) -> str:
    """Write `<runs_dir>/<run_id>.json` under the output root; return its path."""
    return write_json(output_uri, posixpath.join(runs_dir, f"{run_id}.json"), summary, storage_options)
