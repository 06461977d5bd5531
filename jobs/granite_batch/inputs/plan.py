"""Planning a run over a manifest of any size in bounded driver memory.

A re-run must skip the ids the output already holds and process each distinct id once. Holding the
whole manifest and the whole done-set in the driver costs ~1.3 KB a row (130 GB at 100 M rows), so
planning goes by buckets of a digest of the id instead:

1. `prepare_plan` streams the manifest once (block by block, manifest.ManifestStream) and then the
   committed output's `id`/`error` columns (file by file), writing both into `buckets` spool files
   by `bucket_of(id)` under a plan folder on the output's filesystem (so cluster workers read it);
2. `plan_bucket(layout, b)` plans one bucket on its own: the first row of each id in manifest order,
   the others counted as duplicates, then an anti-join against the bucket's done ids (`retry_failed`
   counts failed ids as not done, and so do committed rows a redo selection holds for: inputs/redo.py).
   A read task per bucket feeds its rows into the pipeline
   (pipeline.planned_rows); `plan_counts` runs the same plan over the `id` column alone, for the
   counts the run summary starts with.

The driver holds one manifest block and the spool's write buffer; a read task holds one bucket,
about ROWS_PER_BUCKET rows whatever the manifest's size.
"""

from __future__ import annotations

import logging
import math
import posixpath
import tempfile
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from granite_batch.inputs.manifest import ManifestStream
from granite_batch.inputs.redo import Selection, columns_needed, selected
from granite_batch.inputs.rows import ManifestError, conform_rows, differing_duplicates, first_of_each_id
from granite_batch.output.committed import DatasetFiles, failure_reasons, iter_committed_batches, list_dataset_files
from granite_batch.output.delta import delta_batches, delta_rows, is_delta
from granite_batch.output.replace import Replacements
from granite_batch.schema import STAGING_DIR, TRANSCRIPTS_DIR
from granite_batch.storage import LOCAL_PROTOCOLS, OutputRoot, filesystem, uri_of

PLAN_DIR = "plan"
ROWS_PER_BUCKET = 250_000  # what one read task holds: ~60 MB of manifest rows
BYTES_PER_BUCKET = 256 << 20  # ... or fewer rows, when they carry their audio (embedded bytes, tar shards)
EMBEDDED_ROW_BYTES = 4096  # rows this large carry their audio
INPUT_BLOCK_BYTES = 32 << 20  # rows with embedded audio leave planning in blocks of about this much
MAX_BUCKETS = 4096
SPOOL_BYTES = 64 << 20  # the driver's write buffer over all buckets
LISTING_BUCKETS = 256
# `redo`: the first redo selection that holds for the committed row (null: none does).
DONE_SCHEMA = pa.schema([("id", pa.string()), ("ok", pa.bool_()), ("redo", pa.int16())])
log = logging.getLogger(__name__)

COUNT_KEYS = ("rows_in", "duplicates", "duplicates_differing", "rows_already_done", "rows_to_do", "rows_retried")

_P = 0x100000001B3  # FNV's 64-bit prime: odd, so invertible modulo 2**64
_P_INVERSE = pow(_P, -1, 1 << 64)


def bucket_of(ids: pa.Array | pa.ChunkedArray, buckets: int) -> np.ndarray:
    """The bucket (0 .. buckets-1) of each id: a polynomial hash of its UTF-8 bytes, vectorised.

    Each id's hash is sum((byte_i + 1) * P**i) over its own bytes; it is computed over the whole
    buffer at once (P**global_position) and brought back to the id's start by multiplying with
    P**-start, so no per-byte position array is built. The same in every process and machine.
    """
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    if ids.type != pa.string():
        ids = ids.cast(pa.string())
    n = len(ids)
    if n == 0 or buckets == 1:
        return np.zeros(n, np.uint32)
    offsets = np.frombuffer(ids.buffers()[1], dtype=np.int32)[ids.offset : ids.offset + n + 1].astype(np.int64)
    start, end = int(offsets[0]), int(offsets[-1])
    if end == start:
        return np.zeros(n, np.uint32)
    data = np.frombuffer(ids.buffers()[2], dtype=np.uint8)[start:end]
    starts = np.minimum(offsets[:-1] - start, end - start - 1)
    powers = np.full(end - start, _P, np.uint64)
    powers[0] = 1
    np.cumprod(powers, out=powers)
    hashes = np.add.reduceat((data + np.uint64(1)) * powers, starts)
    powers.fill(_P_INVERSE)
    powers[0] = 1
    np.cumprod(powers, out=powers)
    hashes *= powers[starts]
    hashes[offsets[1:] == offsets[:-1]] = 0
    # murmur3's finaliser spreads the low bits before the modulo.
    hashes ^= hashes >> np.uint64(33)
    hashes *= np.uint64(0xFF51AFD7ED558CCD)
    hashes ^= hashes >> np.uint64(33)
    hashes *= np.uint64(0xC4CEB9FE1A85EC53)
    hashes ^= hashes >> np.uint64(33)
    return (hashes % np.uint64(buckets)).astype(np.uint32)


def _buckets_for(rows: int, nbytes: int = 0) -> int:
    """Buckets of about ROWS_PER_BUCKET rows and at most about BYTES_PER_BUCKET each, a power of two."""
    wanted = max(1, math.ceil(rows / ROWS_PER_BUCKET), math.ceil(nbytes / BYTES_PER_BUCKET))
    return min(MAX_BUCKETS, 1 << (wanted - 1).bit_length())


class _Spool:
    """Tables split into bucket files, `<folder>/<bucket>/<piece>.arrow`, written whenever the
    buffered rows pass `budget_bytes` (each bucket's share of a flush is one piece)."""

    def __init__(self, fs, folder: str, buckets: int, budget_bytes: int):
        self.fs, self.folder, self.buckets, self.budget_bytes = fs, folder, buckets, budget_bytes
        self._parts: list[list[pa.Table]] = [[] for _ in range(buckets)]
        self._bytes = 0
        self.bytes_in = 0  # of every table added
        self._pieces = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows == 0:
            return
        bucket = bucket_of(table.column("id"), self.buckets)
        order = np.argsort(bucket, kind="stable")  # stable: manifest order within each bucket
        counts = np.bincount(bucket, minlength=self.buckets)
        ordered = table.take(pa.array(order)) if self.buckets > 1 else table
        start = 0
        for b in np.flatnonzero(counts).tolist():
            self._parts[b].append(ordered.slice(start, int(counts[b])))
            start += int(counts[b])
        self._bytes += ordered.nbytes
        self.bytes_in += ordered.nbytes
        if self._bytes >= self.budget_bytes:
            self.flush()

    def flush(self) -> None:
        # Compressing costs ~0.4 s of CPU per million rows: worth it only where bytes cross a network.
        local = (self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]) in LOCAL_PROTOCOLS
        options = pa.ipc.IpcWriteOptions(compression=None if local else "lz4")
        for b, parts in enumerate(self._parts):
            if not parts:
                continue
            table = pa.concat_tables(parts, promote_options="permissive")
            path = posixpath.join(self.folder, f"{b:05d}", f"{self._pieces:06d}.arrow")
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
            with self.fs.open(path, "wb") as handle:
                with pa.ipc.new_file(handle, table.schema, options=options) as writer:
                    writer.write_table(table)
            parts.clear()
        self._pieces += 1
        self._bytes = 0


def _read_bucket(fs, folder: str, bucket: int, schema: pa.Schema, columns: list[str] | None = None) -> pa.Table:
    """Every piece of one bucket, in the order written, conformed to `schema` (or its `columns`)."""
    if columns is not None:
        schema = pa.schema([schema.field(c) for c in columns])
    directory = posixpath.join(folder, f"{bucket:05d}")
    try:
        paths = sorted(fs.ls(directory, detail=False))
    except FileNotFoundError:
        paths = []
    local = (fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]) in LOCAL_PROTOCOLS
    tables = []
    for path in paths:
        if local:  # mapped, so reading only the `id` column touches only its pages
            piece = pa.ipc.open_file(pa.memory_map(path)).read_all()
        else:
            with fs.open(path, "rb") as handle:
                piece = pa.ipc.open_file(pa.py_buffer(handle.read())).read_all()
        tables.append(conform_rows(piece, schema))
    return pa.concat_tables(tables) if tables else schema.empty_table()


@dataclass
class CommittedCounts:
    """What the output held when the plan was made."""

    rows_ok: int = 0
    rows_failed: int = 0
    failures_by_reason: Counter = field(default_factory=Counter)
    files: int = 0
    failed_files: list[str] = field(default_factory=list)  # ours, holding rows with an error
    foreign_files: list[str] = field(default_factory=list)  # skipped by name, with a warning
    rows_selected: list[int] = field(default_factory=list)  # committed rows per redo selection


@dataclass
class PlanLayout:
    """Where a prepared plan lies and what it holds; small and picklable, for read tasks."""

    folder: str  # URI of the plan's folder
    buckets: int
    schema: pa.Schema  # the normalised manifest rows (manifest.normalised_schema and passthrough)
    rows_in: int
    ids_replaced: int  # rows whose empty/blank/null id was replaced by the digest id
    manifest_files: list[str]
    shard_members_skipped: dict[str, int]  # tar shard members that gave no row, by reason
    passthrough: list[str]
    retry_failed: bool
    committed: CommittedCounts
    redo: list[str] = field(default_factory=list)  # the redo selections, as written
    storage_options: dict | None = None
    bytes_per_row: float = 0.0  # of the manifest rows, embedded audio included (sizes input blocks)

    def input_block_rows(self, max_rows: int) -> int:
        """Rows per input block: `max_rows`, fewer when rows carry their audio (INPUT_BLOCK_BYTES)."""
        return max(1, min(max_rows, int(INPUT_BLOCK_BYTES // max(1.0, self.bytes_per_row))))

    def bucket_uri(self, kind: str) -> str:
        return posixpath.join(self.folder, kind)


def plan_folder(output_uri: str, run_id: str) -> str:
    """The run's plan folder, `OUTPUT/_staging/<run_id>/plan`: the output's filesystem, so every
    worker of a cluster can read it, removed with the run's staging folder."""
    return posixpath.join(output_uri.rstrip("/"), STAGING_DIR, run_id, PLAN_DIR)


def prepare_plan(
    stream: ManifestStream,
    output: OutputRoot,
    folder: str,
    *,
    retry_failed: bool = False,
    buckets: int | None = None,
    spool_bytes: int = SPOOL_BYTES,
    dataset_dir: str = TRANSCRIPTS_DIR,
    redo: list[Selection] | None = None,
    replacements: Replacements | None = None,
) -> PlanLayout:
    """Stream the manifest and the output's committed ids into bucket files under `folder`.

    Committed rows that one of the `redo` selections holds for count as not done; their ids and files
    go into `replacements`, so the writer can put each new row in place of its old one.

    Raises ManifestError for a bad manifest and output.OutputError for one of our own output files
    that cannot be read; files under the dataset that are not ours are skipped, by name.
    """
    fs, root = output.fs_and_path
    plan_fs, plan_path = filesystem(folder, output.storage_options)
    if plan_fs.exists(plan_path):
        plan_fs.rm(plan_path, recursive=True)
    delta = dataset_dir == TRANSCRIPTS_DIR and is_delta(output)
    if delta:  # a Delta table's rows are its current version's, not the files under it
        dataset, committed_rows = DatasetFiles([], []), delta_rows(output)
    else:
        dataset = list_dataset_files(fs, root, dataset_dir)
        committed_rows = sum(_parquet_rows(fs, path) for path in dataset.ours)

    blocks = iter(stream)
    held: list[pa.Table] = []
    held_bytes, exhausted = 0, False
    if buckets is None:  # read until the buffer fills: small manifests are counted, big ones estimated
        for block in blocks:
            held.append(block)
            held_bytes += block.nbytes
            if held_bytes >= spool_bytes:
                break
        else:
            exhausted = True
        held_rows = sum(t.num_rows for t in held)
        bytes_per_row = held_bytes / max(1, held_rows)
        if exhausted:
            rows, nbytes = held_rows, held_bytes
        elif stream.listing:  # rows unknown; a listing of tar shards is sized by their bytes
            rows = LISTING_BUCKETS * ROWS_PER_BUCKET
            nbytes = stream.size_bytes() if bytes_per_row > EMBEDDED_ROW_BYTES else 0
        else:  # as if the rest of the files held rows like these (compressed Parquet holds more)
            nbytes = stream.size_bytes()
            rows = int(nbytes / bytes_per_row)
        buckets = _buckets_for(max(rows, committed_rows), nbytes)
    else:
        bytes_per_row = 0.0

    spool = _Spool(plan_fs, posixpath.join(plan_path, "manifest"), buckets, spool_bytes)
    for block in held:
        spool.add(block)
    held.clear()
    if not exhausted:
        for block in blocks:
            spool.add(block)
    spool.flush()
    if not bytes_per_row and stream.rows_in:
        bytes_per_row = spool.bytes_in / stream.rows_in
    if stream.rows_in == 0:
        raise ManifestError(f"{stream.uri}: the manifest has no rows")

    redo = redo or []
    counts = CommittedCounts(files=len(dataset.ours), foreign_files=dataset.foreign, rows_selected=[0] * len(redo))
    optional = tuple(sorted(columns_needed(redo)))
    done = _Spool(plan_fs, posixpath.join(plan_path, "done"), buckets, spool_bytes)
    failed_files: dict[str, None] = {}
    batches = (
        delta_batches(output, ("id", "error"), optional)
        if delta
        else iter_committed_batches(fs, dataset.ours, optional=optional)
    )
    for path, table in batches:
        ok = pc.is_null(table.column("error"))
        chosen = pa.nulls(table.num_rows, pa.int16())
        if redo and delta:
            chosen = selected(redo, table)
        elif redo:
            language = posixpath.basename(posixpath.dirname(path)).partition("=")[2]  # ours: language=<lang>/
            table = table.append_column("language", pa.array([language] * table.num_rows, pa.string()))
            chosen = selected(redo, table)
            if replacements is not None and chosen.null_count < table.num_rows:
                replacements.add(path, table.column("id").filter(pc.is_valid(chosen)))
        rows_ok = pc.sum(ok).as_py() or 0
        counts.rows_ok += rows_ok
        if redo:
            for index, count in enumerate(np.bincount(chosen.drop_null().to_numpy(), minlength=len(redo))):
                counts.rows_selected[index] += int(count)
        if rows_ok != table.num_rows:
            counts.rows_failed += table.num_rows - rows_ok
            counts.failures_by_reason.update(failure_reasons(table.column("error")))
            if not delta:  # a Delta table's failed rows are replaced by the merge that commits their new rows
                failed_files[path] = None
        done.add(pa.table({"id": table.column("id").cast(pa.string()), "ok": ok, "redo": chosen}))
    done.flush()
    counts.failed_files = list(failed_files)
    return PlanLayout(
        folder=uri_of(plan_fs, plan_path),
        buckets=buckets,
        schema=stream.schema,
        rows_in=stream.rows_in,
        ids_replaced=stream.ids_replaced,
        manifest_files=stream.files,
        shard_members_skipped=dict(sorted(stream.shard_counts.skipped.items())),
        passthrough=stream.passthrough,
        retry_failed=retry_failed,
        committed=counts,
        redo=[selection.text for selection in redo],
        storage_options=output.storage_options,
        bytes_per_row=bytes_per_row,
    )


def _parquet_rows(fs, path: str) -> int:
    import pyarrow.parquet as pq

    try:
        with fs.open(path, "rb") as handle:
            return pq.ParquetFile(handle).metadata.num_rows
    except (pa.ArrowInvalid, OSError):
        return 0  # iter_committed_batches names the file when it is read


def plan_bucket(layout: PlanLayout, bucket: int) -> tuple[pa.Table, dict]:
    """The rows of one bucket still to do (the first row of each id, in manifest order, whose id has
    no row in the output; with `retry_failed`, or whose row failed), and the bucket's counts."""
    return _plan(layout, bucket)


def _plan(layout: PlanLayout, bucket: int, columns: list[str] | None = None) -> tuple[pa.Table, dict]:
    fs, folder = filesystem(layout.folder, layout.storage_options)
    rows = _read_bucket(fs, posixpath.join(folder, "manifest"), bucket, layout.schema, columns)
    done = _read_bucket(fs, posixpath.join(folder, "done"), bucket, DONE_SCHEMA)
    unique = first_of_each_id(rows)
    differing = differing_duplicates(rows, unique)
    if differing:
        log.warning(
            "%d manifest row(s) repeat an id with another recording; the first row of each id is kept", differing
        )
    ok = done.column("ok")
    redo = done.column("redo")
    counted = pc.and_(ok, pc.is_null(redo)) if layout.retry_failed else pc.is_null(redo)
    done_ids = done.column("id").filter(counted)
    is_done = pc.is_in(unique.column("id"), value_set=done_ids.combine_chunks())
    todo = unique.filter(pc.invert(is_done))
    retried = 0
    if layout.retry_failed and todo.num_rows:
        failed_ids = done.column("id").filter(pc.invert(ok)).combine_chunks()
        retried = pc.sum(pc.is_in(todo.column("id"), value_set=failed_ids)).as_py() or 0
    redone_by = [0] * len(layout.redo)
    if layout.redo and todo.num_rows:
        selected_rows = done.filter(pc.is_valid(redo))
        where = pc.index_in(todo.column("id"), value_set=selected_rows.column("id").combine_chunks())
        reasons = selected_rows.column("redo").combine_chunks().take(where.drop_null())
        for index, count in enumerate(np.bincount(reasons.to_numpy(), minlength=len(layout.redo))):
            redone_by[index] = int(count)
    counts = {
        "rows_in": rows.num_rows,
        "duplicates": rows.num_rows - unique.num_rows,
        "duplicates_differing": differing,
        "rows_already_done": pc.sum(is_done).as_py() or 0,
        "rows_to_do": todo.num_rows,
        "rows_retried": retried,
    }
    if layout.redo:
        counts |= {"rows_redone": sum(redone_by), "rows_redone_by": redone_by}
    return todo, counts


def sum_counts(counts: list[dict]) -> dict:
    """The run's counts from its buckets' (`buckets_planned` says how many were summed)."""
    total: dict = {key: sum(c.get(key, 0) for c in counts) for key in COUNT_KEYS}
    if any("rows_redone" in c for c in counts):  # a run with redo selections
        total["rows_redone"] = sum(c["rows_redone"] for c in counts)
        total["rows_redone_by"] = [sum(column) for column in zip(*(c["rows_redone_by"] for c in counts))]
    total["buckets_planned"] = len(counts)
    return total


def plan_counts(layout: PlanLayout) -> dict:
    """The whole plan's counts, bucket after bucket, reading only the `id` column of the manifest
    rows: what the run summary says from the start, and whether there is anything to do at all. A
    bucket with duplicates is read again with its recordings (`audio`, embedded bytes) to count the
    duplicates that name another recording."""
    recording = [c for c in ("audio", "audio_bytes") if c in layout.schema.names]
    counts = []
    for bucket in range(layout.buckets):
        bucket_counts = _plan(layout, bucket, columns=["id"])[1]
        if bucket_counts["duplicates"]:
            bucket_counts = _plan(layout, bucket, columns=["id", *recording])[1]
        counts.append(bucket_counts)
    return sum_counts(counts)


def discard_plan(output: OutputRoot, run_id: str, output_created: bool = False) -> None:
    """Remove what planning left in the output of a run that stopped before any work: the run's
    staging folder, `_staging` when nothing else is in it, and the output root if the run made it."""
    fs, root = output.fs_and_path
    run_folder = posixpath.join(root, STAGING_DIR, run_id)
    if fs.exists(run_folder):
        fs.rm(run_folder, recursive=True)
    for folder in [posixpath.join(root, STAGING_DIR)] + ([root] if output_created else []):
        try:
            if fs.exists(folder) and not fs.ls(folder, detail=False):
                fs.rmdir(folder)
        except OSError:  # someone else's files arrived meanwhile: leave them
            return


@dataclass
class Status:
    """What `granite-batch status` reports: rows in the output, and with a manifest its pending ids."""

    committed: CommittedCounts
    manifest: dict | None = None  # sum_counts over the manifest's buckets (rows_to_do: pending)


def count_status(
    output: OutputRoot,
    stream: ManifestStream | None = None,
    *,
    buckets: int | None = None,
    dataset_dir: str = TRANSCRIPTS_DIR,
) -> Status:
    """Done/failed rows of the output and, with a manifest, how many of its distinct ids have no row:
    the same bucketed plan as a run, in a local temporary folder, one bucket in memory at a time."""
    if stream is None:
        fs, root = output.fs_and_path
        if dataset_dir == TRANSCRIPTS_DIR and is_delta(output):
            dataset, batches = DatasetFiles([], []), delta_batches(output, ("id", "error"))
        else:
            dataset = list_dataset_files(fs, root, dataset_dir)
            batches = iter_committed_batches(fs, dataset.ours)
        counts = CommittedCounts(files=len(dataset.ours), foreign_files=dataset.foreign)
        for _, table in batches:
            rows_ok = table.column("error").null_count
            counts.rows_ok += rows_ok
            counts.rows_failed += table.num_rows - rows_ok
            counts.failures_by_reason.update(failure_reasons(table.column("error")))
        return Status(counts)
    with tempfile.TemporaryDirectory(prefix="granite-batch-status-") as folder:
        layout = prepare_plan(stream, output, folder, buckets=buckets, dataset_dir=dataset_dir)
        totals = plan_counts(layout)
    return Status(layout.committed, totals)
