"""Compaction of the transcripts dataset: small files of a language partition merged into files of
about a target size, the rows unchanged (run/compaction.py holds the lease while this runs).

Plain Parquet files cannot change together, so each merge is three steps: the merged file is written
under `_staging/`, a journal `OUTPUT/_compactions/<id>-<n>.json` names it and its source files, then
the merged file is moved into place and the sources are removed. Between the last two steps a reader
listing the partition can see the merged rows twice (for about one delete per source file); a crash
there leaves the journal, and the next compaction or run on the output (both take the lease first)
removes the sources the journal names before doing anything else, so no id keeps two rows. A table
format gives readers one snapshot instead: output formats.
"""

from __future__ import annotations

import json
import logging
import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq

from granite_batch.output.committed import list_dataset_files
from granite_batch.schema import STAGING_DIR, TRANSCRIPTS_DIR
from granite_batch.storage import OutputRoot, uri_of

log = logging.getLogger(__name__)

JOURNAL_DIR = "_compactions"
DEFAULT_TARGET_MB = 256.0


@dataclass
class Compaction:
    """What one compaction did, per language partition and in all."""

    files_before: int = 0
    files_after: int = 0
    rows: int = 0  # rows in the files merged
    merged: dict[str, int] = field(default_factory=dict)  # language -> files merged away
    skipped: list[str] = field(default_factory=list)  # groups whose files cannot share one schema
    recovered: int = 0  # source files of an interrupted compaction removed first

    def as_dict(self) -> dict:
        return {
            "files_before": self.files_before,
            "files_after": self.files_after,
            "rows_merged": self.rows,
            "files_merged_by_language": dict(sorted(self.merged.items())),
            "skipped": self.skipped,
            "sources_removed_from_an_interrupted_compaction": self.recovered,
        }


def finish_compactions(output: OutputRoot) -> int:
    """Finish what an interrupted compaction left (its journals): remove the source files of every
    merged file that was moved into place, drop the journal. Call it holding the lease, before
    planning. Returns how many source files were removed."""
    fs, folder = output.fs, output.join(JOURNAL_DIR)
    if not fs.exists(folder):
        return 0
    removed = 0
    for path in sorted(fs.find(folder)):
        with fs.open(path, "r") as handle:
            journal = json.load(handle)
        if fs.exists(journal["merged"]):
            for source in journal["sources"]:
                if fs.exists(source):
                    fs.rm(source)
                    removed += 1
        fs.rm(path)
    if removed:
        log.warning("removed %d source file(s) of an interrupted compaction (their rows are merged)", removed)
    try:
        if not fs.ls(folder, detail=False):
            fs.rmdir(folder)
    except OSError:
        pass
    return removed


def _groups(files: list[tuple[str, int]], target_bytes: int) -> list[list[str]]:
    """Files (in name order) into groups of at most `target_bytes` (only groups of two or more merge);
    a file of the target size or more stays alone."""
    groups: list[list[str]] = []
    current: list[str] = []
    size = 0
    for path, nbytes in files:
        if nbytes >= target_bytes:
            continue
        if current and size + nbytes > target_bytes:
            groups.append(current)
            current, size = [], 0
        current.append(path)
        size += nbytes
    groups.append(current)
    return [group for group in groups if len(group) > 1]


def compact_dataset(
    output: OutputRoot,
    compaction_id: str,
    target_mb: float = DEFAULT_TARGET_MB,
    before_commit: Callable[[], None] | None = None,
    dataset_dir: str = TRANSCRIPTS_DIR,
) -> Compaction:
    """Merge the small files of each language partition of the dataset into files of about `target_mb`
    (Parquet bytes, zstd), rows and columns unchanged; `before_commit` (a lease check) runs before
    each merged file goes into place. Foreign files are left alone."""
    fs, root = output.fs_and_path
    result = Compaction(recovered=finish_compactions(output))
    ours = list_dataset_files(fs, root, dataset_dir).ours
    result.files_before = result.files_after = len(ours)
    by_language: dict[str, list[tuple[str, int]]] = {}
    for path in ours:
        by_language.setdefault(posixpath.basename(posixpath.dirname(path)), []).append((path, fs.size(path)))
    target_bytes = int(target_mb * (1 << 20))
    sequence = 0
    for partition, files in sorted(by_language.items()):
        for group in _groups(files, target_bytes):
            tables = []
            for path in group:
                with fs.open(path, "rb") as handle:
                    tables.append(pq.read_table(handle))
            try:
                merged = pa.concat_tables(tables, promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
                result.skipped.append(f"{partition}: {len(group)} files whose columns differ in type ({exc})")
                continue
            sequence += 1
            name = f"part-{compaction_id}-{sequence:05d}.parquet"
            staged = posixpath.join(root, STAGING_DIR, compaction_id, partition, name)
            final = posixpath.join(root, dataset_dir, partition, name)
            fs.makedirs(posixpath.dirname(staged), exist_ok=True)
            with fs.open(staged, "wb") as handle:
                pq.write_table(merged, handle, compression="zstd")
            journal = posixpath.join(root, JOURNAL_DIR, f"{compaction_id}-{sequence:05d}.json")
            fs.makedirs(posixpath.dirname(journal), exist_ok=True)
            with fs.open(journal, "w") as handle:
                json.dump({"merged": final, "sources": group}, handle)
            if before_commit is not None:
                before_commit()  # the sources stay as they are if this raises
            fs.mv(staged, final)
            for path in group:
                fs.rm(path)
            fs.rm(journal)
            log.info("merged %d files into %s (%d rows)", len(group), uri_of(fs, final), merged.num_rows)
            result.rows += merged.num_rows
            result.files_after -= len(group) - 1
            language = partition.partition("=")[2]
            result.merged[language] = result.merged.get(language, 0) + len(group)
    finish_compactions(output)  # removes the journal folder
    staging = posixpath.join(root, STAGING_DIR, compaction_id)
    if fs.exists(staging):
        fs.rm(staging, recursive=True)
    try:
        if not fs.ls(posixpath.join(root, STAGING_DIR), detail=False):
            fs.rmdir(posixpath.join(root, STAGING_DIR))
    except (FileNotFoundError, OSError):  # none, or another run's files arrived: leave them
        pass
    return result
