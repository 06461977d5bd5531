"""Read and validate an audio manifest (JSON Lines, CSV or Parquet; a file, folder or prefix).

Schema problems stop the job before any work, with an error naming the file, line/row and field.
Value problems (unsupported language, pair or task) become the row's `error` and the row goes on.

Files are read in blocks by pyarrow's own readers and normalised with Arrow compute, so a manifest
of any size streams through in bounded memory (`ManifestStream`). A block that pyarrow refuses (a
malformed line, or one column written in two allowed forms, as hand-written manifests do) is read
again by the slow path, one Python object per line, which either normalises it or names the line.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from granite_batch.inputs.formats import _BLOCK_READERS, BLOCK_BYTES, _Block, _rows_to_table, _SlowPath
from granite_batch.inputs.listing import AUDIO_SUFFIXES, _iter_listing
from granite_batch.inputs.normalise import _as_reference, _check_columns, _first_valid, _normalise, _type_name, _Where
from granite_batch.inputs.rows import (
    NORMALISED_FIELDS,
    Defaults,
    Manifest,
    ManifestError,
    conform_rows,
    differing_duplicates,
    first_of_each_id,
    normalised_schema,
)
from granite_batch.inputs.shards import ShardCounts, ShardError, is_shard, iter_samples, member_uri
from granite_batch.output.committed import OWN_FILE
from granite_batch.schema import EVAL_DIR, FLAG_COLUMNS, RUNS_DIR, SECOND_PASS_DIR, STAGING_DIR, TRANSCRIPTS_DIR
from granite_batch.storage import filesystem, uri_of

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}


LEASES_DIR = "_leases"  # run/lease.py's, which this room may not import
# What the job writes under an output root; an output root inside a manifest folder is recognised by
# its lease or staging folder, or by committed files the job named (output/committed.py's OWN_FILE).
OUTPUT_FOLDERS = frozenset({TRANSCRIPTS_DIR, RUNS_DIR, STAGING_DIR, LEASES_DIR, SECOND_PASS_DIR, EVAL_DIR, "subtitles"})


def _output_roots(paths: list[str]) -> set[str]:
    """The folders among `paths`' ancestors that are a granite-batch output root."""
    roots = set()
    for path in paths:
        parts = path.split("/")
        for depth, part in enumerate(parts[:-1]):
            own = part == TRANSCRIPTS_DIR and OWN_FILE.fullmatch("/".join(parts[depth + 1 :]))
            if part in (LEASES_DIR, STAGING_DIR) or own:
                roots.add("/".join(parts[:depth]))
    return roots


def _is_job_output(path: str, roots: set[str]) -> bool:
    return any(
        path.startswith(root + "/") and path[len(root) + 1 :].split("/", 1)[0] in OUTPUT_FOLDERS for root in roots
    )


def _list_manifest_files(fs, path: str) -> list[str]:
    if fs.isdir(path):
        found = sorted(fs.find(path))
        roots = _output_roots(found)
        files = [
            p for p in found if posixpath.splitext(p)[1].lower() in MANIFEST_SUFFIXES and not _is_job_output(p, roots)
        ]
        if not files:
            raise ManifestError(f"{path}: no manifest files (.jsonl .json .csv .parquet) in this folder")
        return files
    if not fs.exists(path):
        raise ManifestError(f"{path}: manifest not found")
    if posixpath.splitext(path)[1].lower() not in MANIFEST_SUFFIXES:
        raise ManifestError(f"{path}: unknown manifest format; use .jsonl, .json, .csv or .parquet")
    return [path]


class ManifestStream:
    """The normalised rows of a manifest (a file, a folder or prefix of files, or a listing of
    recordings), yielded one block at a time, in manifest order.

    Iterating reads every file once; afterwards `rows_in`, `ids_replaced` and `schema` (the
    contract's columns and every passthrough column, their types unified over all blocks) describe
    what was read. Duplicate ids are not removed here (see `first_of_each_id` and plan.py).
    """

    def __init__(
        self,
        uri: str,
        defaults: Defaults,
        storage_options: dict | None = None,
        *,
        listing: bool = False,
        block_bytes: int = BLOCK_BYTES,
        listing_rows: int = 100_000,
    ):
        self.uri = uri
        self.defaults = defaults
        self.listing = listing
        self.block_bytes = block_bytes
        self.listing_rows = listing_rows
        if listing:
            self.fs, self._pattern = filesystem(uri.replace("{language}", "__LANGUAGE__"), storage_options)
            self._pattern = self._pattern.replace("__LANGUAGE__", "{language}")
            self._paths: list[str] = []
            self.files = [uri]
        else:
            self.fs, path = filesystem(uri, storage_options)
            self._paths = _list_manifest_files(self.fs, path)
            self.files = [uri_of(self.fs, p) for p in self._paths]
        self.protocol = self.fs.protocol if isinstance(self.fs.protocol, str) else self.fs.protocol[0]
        self.rows_in = 0
        self.ids_replaced = 0
        self.shard_counts = ShardCounts()  # shard members that gave no row, by reason
        self._passthrough: dict[
            str, tuple[pa.Field, tuple[str, str] | None]
        ] = {}  # name -> (field, where first non-null)

    @property
    def schema(self) -> pa.Schema:
        return normalised_schema([f for f, _ in self._passthrough.values()])

    @property
    def passthrough(self) -> list[str]:
        return list(self._passthrough)

    def size_bytes(self) -> int:
        """Bytes of the manifest files, or of a listing's tar shards (whose rows carry their audio;
        listed once more), to size what reads them."""
        if self.listing:
            return sum(size for path, _, size in _iter_listing(self.fs, self._pattern, sizes=True) if is_shard(path))
        return sum(self.fs.size(p) for p in self._paths)

    def __iter__(self) -> Iterator[pa.Table]:
        if self.listing:
            yield from self._listing_blocks()
            return
        for path in self._paths:
            kind = MANIFEST_SUFFIXES[posixpath.splitext(path)[1].lower()]
            name = uri_of(self.fs, path)
            first = True
            for block in _BLOCK_READERS[kind](self.fs, path, name, self.block_bytes):
                table, lines = block.table, None
                if table is None:
                    table, lines = block.slow()
                if table.num_rows == 0:
                    continue
                table = _as_reference(table, self.defaults.reference_column, name)
                _check_columns(table, name, first)
                try:
                    out, replaced = _normalise(
                        table, _Where(name, block.where, lines), posixpath.dirname(path), self.protocol, self.defaults
                    )
                except _SlowPath:
                    table, lines = block.slow()
                    table = _as_reference(table, self.defaults.reference_column, name)
                    _check_columns(table, name, first)
                    out, replaced = _normalise(
                        table, _Where(name, block.where, lines), posixpath.dirname(path), self.protocol, self.defaults
                    )
                first = False
                self._unify(out, name, block, lines)
                self.rows_in += out.num_rows
                self.ids_replaced += replaced
                yield out

    def _unify(self, table: pa.Table, name: str, block: _Block, lines: list[int] | None) -> None:
        """Fold the block's passthrough types into the stream's; a clash names the column and two lines."""
        for column in table.schema.names[len(NORMALISED_FIELDS) :]:
            new = table.schema.field(column)
            if column not in self._passthrough:
                self._passthrough[column] = (new, self._where_first(table, column, name, block, lines))
                continue
            old, old_where = self._passthrough[column]
            if old.type == new.type or pa.types.is_null(new.type):
                continue
            if pa.types.is_null(old.type):
                self._passthrough[column] = (new, self._where_first(table, column, name, block, lines))
                continue
            try:
                merged = pa.unify_schemas([pa.schema([old]), pa.schema([new])], promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                if column in FLAG_COLUMNS:  # booleans in one block, text in another: text, read per row
                    self._passthrough[column] = (old.with_type(pa.string()), old_where)
                    continue
                here_name, here_line = self._where_first(table, column, name, block, lines)
                this, that = _type_name(new.type), _type_name(old.type)
                if (this, that) == ("dict", "dict") or (this, that) == ("list", "list"):
                    this, that = str(new.type), str(old.type)
                there = old_where[1] if old_where[0] == here_name else f"{old_where[0]} {old_where[1]}"
                raise ManifestError(
                    f"{here_name}: {here_line}: field {column!r} is {this}, but {there} has {that}"
                ) from None
            self._passthrough[column] = (merged.field(column), old_where)

    @staticmethod
    def _where_first(
        table: pa.Table, column: str, name: str, block: _Block, lines: list[int] | None
    ) -> tuple[str, str] | None:
        """(file, "line N") of the column's first non-null value in the block."""
        array = table.column(column)
        if array.null_count == len(array):
            return None
        index = _first_valid(array)
        numbers = lines if lines is not None else block.line_numbers()
        return name, f"{block.where} {numbers[index]}"

    def _listing_blocks(self) -> Iterator[pa.Table]:
        """Rows of the recordings listed, and of every audio member of each tar shard listed (its
        bytes, and its sidecar's columns), in blocks of `listing_rows` rows or `block_bytes` of audio."""
        rows: list[dict] = []
        member_errors: list[str | None] = []  # per row: a shard member's own error (a link)
        held_bytes = 0
        done = 0
        embedded = pa.struct([("bytes", pa.large_binary()), ("path", pa.string())])

        def flush() -> pa.Table:
            nonlocal done, held_bytes
            lines = list(range(done + 1, done + len(rows) + 1))
            where = f"{self.uri} listing"
            audio = pa.array([row.pop("audio") for row in rows], embedded)
            table = _rows_to_table(rows, lines, where).append_column("audio", audio)  # every row has `language`
            table = _as_reference(table, self.defaults.reference_column, where)
            _check_columns(table, where, first_block=False)  # a sidecar's `text` would shadow the output's
            out, replaced = _normalise(table, _Where(where, "line", lines), "", self.protocol, self.defaults)
            if any(member_errors):  # links in a shard: a row each, with its error
                at = out.schema.get_field_index("error")
                errors = pc.coalesce(pa.array(member_errors, pa.string()), out.column(at))
                out = out.set_column(at, out.schema.field(at), errors)
            member_errors.clear()
            self._unify(out, where, _Block(None, None, lambda: lines), lines)
            self.rows_in += out.num_rows
            self.ids_replaced += replaced
            done += len(rows)
            rows.clear()
            held_bytes = 0
            return out

        try:
            for path, path_language in _iter_listing(self.fs, self._pattern):
                uri = uri_of(self.fs, path)
                if not is_shard(path):
                    rows.append({"audio": {"bytes": None, "path": uri}, "language": path_language})
                    member_errors.append(None)
                else:
                    try:
                        for sample in iter_samples(self.fs, path, AUDIO_SUFFIXES, uri, self.shard_counts):
                            columns = {k: v for k, v in sample.sidecar.items() if k != "audio"}
                            columns.setdefault("language", path_language)
                            audio = {"bytes": sample.data, "path": member_uri(uri, sample.name)}
                            rows.append({**columns, "audio": audio})
                            member_errors.append(sample.error)
                            held_bytes += len(sample.data)
                            if len(rows) >= self.listing_rows or held_bytes >= self.block_bytes:
                                yield flush()
                    except ShardError as exc:
                        raise ManifestError(str(exc)) from None
                if len(rows) >= self.listing_rows:
                    yield flush()
        except FileNotFoundError:
            raise ManifestError(f"{self.uri}: no such prefix") from None
        if rows:
            yield flush()
        for reason, count in sorted(self.shard_counts.skipped.items()):
            log.warning("%s: %d shard member(s) skipped: %s", self.uri, count, reason)
        if self.rows_in == 0:
            raise ManifestError(f"{self.uri}: no recordings match")


def read_manifest(uri: str, defaults: Defaults, storage_options: dict | None = None) -> Manifest:
    """Read every manifest file under `uri`, validate it and apply the job's defaults (in memory;
    plan.py plans manifests of any size without holding them)."""
    stream = ManifestStream(uri, defaults, storage_options)
    return _collect(stream, dedupe=True)


def _collect(stream: ManifestStream, dedupe: bool) -> Manifest:
    tables = list(stream)
    if not tables:
        raise ManifestError(f"{stream.uri}: the manifest has no rows")
    schema = stream.schema
    combined = pa.concat_tables([conform_rows(t, schema) for t in tables])
    unique = first_of_each_id(combined) if dedupe else combined
    differing = differing_duplicates(combined, unique)
    if differing:
        log.warning(
            "%s: %d row(s) repeat an id with another recording; the first row of each id is kept", stream.uri, differing
        )
    return Manifest(
        duplicates_differing=differing,
        table=unique,
        rows_in=stream.rows_in,
        duplicates=combined.num_rows - unique.num_rows,
        files=stream.files,
        passthrough=stream.passthrough,
        ids_replaced=stream.ids_replaced,
    )


def list_recordings(
    uri: str, defaults: Defaults, storage_options: dict | None = None, chunk_rows: int = 100_000
) -> Manifest:
    """Build the manifest by listing `uri` (a prefix or glob; `{language}` takes it from the path)."""
    stream = ManifestStream(uri, defaults, storage_options, listing=True, listing_rows=chunk_rows)
    return _collect(stream, dedupe=False)
