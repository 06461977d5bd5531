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

import logging
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from granite_batch.output.replace import Replacements
from granite_batch.schema import STAGING_DIR, TRANSCRIPTS_DIR, conform, file_schema
from granite_batch.storage import OutputRoot, uri_of

log = logging.getLogger(__name__)


class TranscriptWriter:
    """Streams transcript rows into a modest number of Parquet files per language partition.

    A file is closed and moved into place after `rows_per_file` rows, after `commit_interval_s`
    seconds (so a long run makes its progress durable), and at `close()`.
    """

    def __init__(
        self,
        output: OutputRoot,
        run_id: str,
        schema: pa.Schema,
        rows_per_file: int = 200_000,
        commit_interval_s: float = 600.0,
        dataset_dir: str = TRANSCRIPTS_DIR,
        before_commit: Callable[[], None] | None = None,
        replacements: Replacements | None = None,
    ):
        self.fs, self.root = output.fs_and_path
        self.before_commit = before_commit  # raises to stop a commit, e.g. a lease check
        self.replacements = replacements  # old rows that new ones replace in place (output/replace.py)
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

    def _start(self, language: str) -> _OpenFile:
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
        if self.replacements is not None and len(self.replacements):
            scratch = posixpath.join(self.root, STAGING_DIR, self.run_id, "replace")
            if not self.replacements.commit(self.fs, handle.staged, language, scratch, self.before_commit):
                return  # every row took the place of an old one
        self.fs.makedirs(posixpath.dirname(handle.final), exist_ok=True)
        if self.before_commit is not None:
            self.before_commit()  # last moment: the file stays staged if this raises
        self.fs.mv(handle.staged, handle.final)
        self.committed.append(uri_of(self.fs, handle.final))
        log.info("committed %s (%d rows)", handle.final, handle.rows)


@dataclass
class _OpenFile:
    staged: str
    final: str
    stream: object
    writer: pq.ParquetWriter
    rows: int = 0
    opened_at: float = field(default_factory=time.monotonic)
