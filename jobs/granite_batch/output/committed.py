"""What the output root already holds: its committed files, the ids in them, and
rewrites that drop rows (retry of failed rows).
"""

from __future__ import annotations

import logging
import posixpath
import re
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
import pyarrow.parquet as pq

from granite_batch.schema import STAGING_DIR, TRANSCRIPTS_DIR
from granite_batch.storage import OutputRoot, uri_of

log = logging.getLogger(__name__)

# Our own files, by name: anything else under a dataset folder (an older job's file, a README) is foreign.
OWN_FILE = re.compile(r"language=(?P<language>[^/]+)/part-(?P<run_id>.+)-(?P<sequence>\d{5,})\.parquet")


COMMITTED_COLUMNS = ("id", "error")

# `language` lives in the folder names; declared as a plain string so it never comes back as a dictionary.
PARTITIONING = pads.partitioning(pa.schema([("language", pa.string())]), flavor="hive")


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
        log.warning(
            "skipping %d file(s) under %s not written by granite-batch: %s", len(foreign), uri_of(fs, base), shown
        )
    return DatasetFiles(ours, [uri_of(fs, p) for p in foreign])


def iter_committed_batches(
    fs,
    paths: list[str],
    columns: tuple[str, ...] = COMMITTED_COLUMNS,
    batch_rows: int = 262_144,
    optional: tuple[str, ...] = (),
):
    """Yield (path, table of `columns`) for each of our committed files, a few batches per file,
    with those of the `optional` columns the file has.

    A file with our name that cannot be read, or lacks one of `columns`, raises OutputError naming it.
    """
    for path in paths:
        try:
            with fs.open(path, "rb") as handle:
                parquet = pq.ParquetFile(handle)
                missing = [c for c in columns if c not in parquet.schema_arrow.names]
                if missing:
                    raise OutputError(
                        f"{uri_of(fs, path)}: committed file lacks column {missing[0]!r}; "
                        "move it out of the output root or repair it"
                    )
                present = [c for c in optional if c in parquet.schema_arrow.names and c not in columns]
                for batch in parquet.iter_batches(batch_size=batch_rows, columns=list(columns) + present):
                    yield path, pa.Table.from_batches([batch])
        except (pa.ArrowInvalid, OSError) as exc:
            raise OutputError(f"{uri_of(fs, path)}: committed file is not readable Parquet ({exc})") from None


def unified_schema(schemas: list[pa.Schema], where: str = "") -> pa.Schema:
    """One schema for files written by different runs: columns only some runs had are kept (null
    elsewhere), types are promoted where Arrow can (int32 and int64), and a passthrough column whose
    type drifted between runs in a way that cannot be promoted (text one night, all digits the next)
    is read as text. A drift between nested types, which cannot be read as text, raises OutputError."""
    try:
        return pa.unify_schemas(schemas, promote_options="permissive")
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        pass
    types: dict[str, list[pa.DataType]] = {}
    for schema in schemas:
        for f in schema:
            types.setdefault(f.name, []).append(f.type)
    as_text = []
    for name, seen in types.items():
        try:
            pa.unify_schemas([pa.schema([(name, t)]) for t in seen], promote_options="permissive")
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            if any(pa.types.is_nested(t) for t in seen):
                raise OutputError(
                    f"{where}: column {name!r} has types that cannot be read together in different runs' "
                    f"files ({', '.join(sorted({str(t) for t in seen}))}); rename it in the manifest"
                ) from None
            as_text.append(name)
    log.warning("%s: column(s) %s changed type between runs; read as text", where, ", ".join(as_text))
    return pa.unify_schemas(
        [pa.schema([f.with_type(pa.string()) if f.name in as_text else f for f in s]) for s in schemas],
        promote_options="permissive",
    )


def committed_dataset(fs, root: str, dataset_dir: str = TRANSCRIPTS_DIR) -> pads.Dataset | None:
    """Our committed files under `root/dataset_dir` as one Arrow dataset with `language` from the
    folder names, or None when there are none. The one reader of committed rows for every command
    (results.load, eval, second-pass): files not written by the job are skipped (as the run and
    status do), and columns whose type drifted between runs are unified (`unified_schema`)."""
    files = list_dataset_files(fs, root, dataset_dir).ours
    if not files:
        return None
    base = posixpath.join(root, dataset_dir)
    dataset = pads.dataset(files, filesystem=fs, format="parquet", partitioning=PARTITIONING, partition_base_dir=base)
    schemas = [fragment.physical_schema for fragment in dataset.get_fragments()]
    schema = unified_schema([*schemas, PARTITIONING.schema], uri_of(fs, base))
    return pads.dataset(
        files, schema=schema, filesystem=fs, format="parquet", partitioning=PARTITIONING, partition_base_dir=base
    )


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


def read_committed(output: OutputRoot, dataset_dir: str = TRANSCRIPTS_DIR) -> Committed:
    """Scan the committed rows of a dataset under the output root (only `id` and `error`), one file
    at a time: the transcripts, or another dataset such as a second pass's. Holds every id in memory;
    plan.py plans and counts without doing so."""
    fs, root = output.fs_and_path
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


def drop_rows(output: OutputRoot, ids_by_file: dict[str, list[str]]) -> None:
    """Rewrite each file without the given ids (atomically replacing it), or remove it if nothing is left.

    Used before failed rows are retried: a crash after this leaves those ids with no row, so the
    next run redoes them; it never leaves two rows for one id.
    """
    fs, root = output.fs_and_path
    for path, ids in ids_by_file.items():
        value_set = pa.array(ids, pa.string())
        _rewrite_without(fs, root, path, lambda table, ids=value_set: pc.is_in(table.column("id"), value_set=ids))


def drop_failed_rows(output: OutputRoot, paths: list[str]) -> None:
    """Rewrite each of our files in `paths` without its rows that have an `error`, as drop_rows does,
    without holding their ids (plan.py's `PlanLayout.failed_files` lists the files)."""
    fs, root = output.fs_and_path
    for path in paths:
        _rewrite_without(fs, root, path, lambda table: pc.is_valid(table.column("error")))
