"""Read and validate an audio manifest (JSON Lines, CSV or Parquet; a file, folder or prefix).

Schema problems stop the job before any work, with an error naming the file, line/row and field.
Value problems (unsupported language, pair or task) become the row's `error` and the row goes on.

Files are read in blocks by pyarrow's own readers and normalised with Arrow compute, so a manifest
of any size streams through in bounded memory (`ManifestStream`). A block that pyarrow refuses (a
malformed line, or one column written in two allowed forms, as hand-written manifests do) is read
again by the slow path, one Python object per line, which either normalises it or names the line.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import posixpath
import re
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from granite_batch.prompts import ASR_LANGUAGES, AUTO_LANGUAGE, UNDETERMINED_LANGUAGE, check_request, unlisted_request
from granite_batch.shards import TAR_SUFFIXES, ShardError, is_shard, iter_samples, member_uri
from granite_batch.storage import LOCAL_PROTOCOLS, filesystem, is_allowed, uri_of  # noqa: F401 (is_allowed: re-exported)

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
KNOWN_COLUMNS = ("id", "audio", "language", "task", "target_language", "keywords", "channels")
TEXT_COLUMNS = ("id", "audio", "language", "task", "target_language", "channels")
# Output columns a manifest may not carry: they would be silently overwritten.
RESERVED_COLUMNS = ("text", "segments", "duration_s", "error", "model", "model_revision", "run_id")
BLOCK_BYTES = 16 << 20  # text read per block: ~100,000 rows of a typical JSON Lines manifest
PARQUET_BLOCK_ROWS = 131_072
CHANNEL_MODES = ("mix", "split")
EMBEDDED_PREFIX = "embedded:"  # the source name of embedded audio that came without a path

NORMALISED_FIELDS = [
    pa.field("id", pa.string()), pa.field("audio", pa.string()), pa.field("language", pa.string()),
    pa.field("task", pa.string()), pa.field("target_language", pa.string()),
    pa.field("keywords", pa.list_(pa.string())), pa.field("error", pa.string()),
    # Inputs of the row's work, not output columns: the recording's bytes when the manifest (or a tar
    # shard) carries them, and how its channels are transcribed.
    pa.field("audio_bytes", pa.large_binary()), pa.field("channels", pa.string()),
]
INPUT_ONLY_COLUMNS = ("audio_bytes", "channels")


class ManifestError(ValueError):
    """The manifest cannot be used; the message names the file, line/row and field."""


class _SlowPath(Exception):
    """The fast path cannot name the line of a problem: read the block again one line at a time."""


@dataclass(frozen=True)
class Defaults:
    """Job-level values for columns a row leaves empty."""

    language: str = "en"
    task: str = "asr"
    target_language: str | None = None
    keywords: tuple[str, ...] = ()
    allowed_prefixes: tuple[str, ...] = ()  # when set, recordings elsewhere become error rows
    channels: str = "mix"  # mix: downmix to mono; split: each channel transcribed on its own
    reference_column: str | None = None  # the column read as `reference` (e.g. HF test sets' `text`)

    @classmethod
    def from_config(cls, config) -> "Defaults":
        """The defaults a job config (`config.JobConfig`) gives rows."""
        return cls(config.language, config.task, config.target_language, tuple(config.keywords),
                   tuple(config.allowed_prefixes), config.channels, config.reference_column)


@dataclass
class Manifest:
    """The validated units of work: one row per distinct id."""

    table: pa.Table
    rows_in: int
    duplicates: int
    files: list[str]
    passthrough: list[str] = field(default_factory=list)
    ids_replaced: int = 0  # rows whose `id` was empty, blank or null and got the digest id


def default_id(audio: str, task: str, target_language: str | None, keywords: list[str]) -> str:
    """A digest of what the row asks for, identical in every run."""
    key = json.dumps([audio, task, target_language, list(keywords)], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def normalised_schema(passthrough: list[pa.Field] | pa.Schema = ()) -> pa.Schema:
    """The schema of normalised manifest rows: the contract's columns, then the passthrough ones."""
    return pa.schema(NORMALISED_FIELDS + [f for f in passthrough if f.name not in KNOWN_COLUMNS + ("error",)])


def _holds_null_type(kind: pa.DataType) -> bool:
    if pa.types.is_null(kind):
        return True
    return any(_holds_null_type(kind.field(i).type) for i in range(kind.num_fields))


def _cast(column: pa.ChunkedArray, kind: pa.DataType) -> pa.ChunkedArray:
    if column.type == kind:
        return column
    if _holds_null_type(column.type):  # pyarrow 26 casts list<null> into offsets past its values
        return pa.chunked_array([pa.array(column.to_pylist(), kind)], kind)
    return column.cast(kind)


def conform_rows(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """`table` with `schema`'s columns in its order and types (absent ones null)."""
    n = table.num_rows
    arrays = [_cast(table.column(f.name), f.type) if f.name in table.column_names else pa.nulls(n, f.type)
              for f in schema]
    return pa.Table.from_arrays(arrays, schema=schema)


def first_of_each_id(table: pa.Table) -> pa.Table:
    """The first row of each distinct `id`, in table order."""
    ids = table.column("id")
    unique = pc.unique(ids)
    if len(unique) == table.num_rows:
        return table
    return table.take(pc.index_in(unique, value_set=ids))  # index_in answers each id's first position


# --- listing the files of a manifest -------------------------------------------------------------

def _list_manifest_files(fs, path: str) -> list[str]:
    if fs.isdir(path):
        files = sorted(
            p for p in fs.find(path) if posixpath.splitext(p)[1].lower() in MANIFEST_SUFFIXES
        )
        if not files:
            raise ManifestError(f"{path}: no manifest files (.jsonl .json .csv .parquet) in this folder")
        return files
    if not fs.exists(path):
        raise ManifestError(f"{path}: manifest not found")
    if posixpath.splitext(path)[1].lower() not in MANIFEST_SUFFIXES:
        raise ManifestError(f"{path}: unknown manifest format; use .jsonl, .json, .csv or .parquet")
    return [path]


# --- blocks: what each format's reader yields ------------------------------------------------------

@dataclass
class _Block:
    """One block of one manifest file, parsed by pyarrow (`table`), with the slow way to read it again."""

    table: pa.Table | None  # None: pyarrow refused the block
    slow: Callable[[], tuple[pa.Table, list[int]]]  # (table, line numbers); raises ManifestError naming a line
    line_numbers: Callable[[], list[int]]  # the line (row) number of each row of `table`
    where: str = "line"


def _python_kind(value) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "float"  # JSON has one number type: ints and floats share a column
    return type(value).__name__


def _value_conflict(values: list, lines: list[int], column: str) -> str | None:
    """For a column pa.array refuses: the first line whose value cannot share a type with an earlier one."""
    def fails(items) -> bool:
        try:
            pa.array(items)
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
            return True
        return False

    if not fails(values):
        return None
    low, high = 0, len(values) - 1  # the shortest failing prefix ends at `high`
    while low < high:
        middle = (low + high) // 2
        if fails(values[: middle + 1]):
            high = middle
        else:
            low = middle + 1
    bad = values[high]
    if fails([bad]):  # the value alone: a list or object whose own items cannot share a type
        return (f"line {lines[high]}: field {column!r} is a {_python_kind(bad)} whose items cannot share "
                "one type")
    earlier = next((j for j in range(high) if values[j] is not None and fails([values[j], bad])), None)
    if earlier is None:
        return f"line {lines[high]}: field {column!r} has a value Arrow cannot type ({_python_kind(bad)})"
    this, that = _python_kind(bad), _python_kind(values[earlier])
    if this == that:  # same outer type, nested types disagree
        this, that = str(pa.array([bad]).type), str(pa.array([values[earlier]]).type)
    return f"line {lines[high]}: field {column!r} is {this}, but line {lines[earlier]} has {that}"


def _canonical_text(value, column: str, where: str):
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise ManifestError(f"{where}: field {column!r} must be a string or an integer, not {_python_kind(value)}")


def _canonical_keywords(value, where: str):
    if value is None:
        return None
    if isinstance(value, str):
        value = value.split(",")
    if isinstance(value, list) and all(part is None or isinstance(part, str) for part in value):
        return value
    kind = _python_kind(value) if not isinstance(value, list) else "a list holding " + ", ".join(
        sorted({_python_kind(part) for part in value if part is not None and not isinstance(part, str)}))
    raise ManifestError(f"{where}: field 'keywords' must be a list of strings or one comma-separated "
                        f"string, not {kind}")


def _rows_to_table(rows: list[dict], lines: list[int], name: str) -> pa.Table:
    """The slow path's table: contract columns in their one canonical form, passthrough as Arrow infers."""
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    arrays, names = [], []
    for column in columns:
        values = [row.get(column) for row in rows]
        if column in TEXT_COLUMNS:
            values = [_canonical_text(v, column, f"{name} line {n}") for v, n in zip(values, lines)]
            array = pa.array(values, pa.string())
        elif column == "keywords":
            values = [_canonical_keywords(v, f"{name} line {n}") for v, n in zip(values, lines)]
            array = pa.array(values, pa.list_(pa.string()))
        else:
            try:
                array = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                raise ManifestError(f"{name}: {_value_conflict(values, lines, column) or exc}") from None
        arrays.append(array)
        names.append(column)
    return pa.Table.from_arrays(arrays, names=names) if names else pa.table({})


# JSON Lines

def _json_slow(chunk: bytes, first_line: int, name: str) -> tuple[pa.Table, list[int]]:
    rows: list[dict] = []
    lines: list[int] = []
    for number, raw in enumerate(chunk.splitlines(), start=first_line):
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{name} line {number}: not valid UTF-8 (byte {exc.start})") from None
        if not text.strip():
            continue
        try:
            row = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{name} line {number}: malformed JSON ({exc.msg} at column {exc.colno})") from None
        if not isinstance(row, dict):
            raise ManifestError(f"{name} line {number}: each line must be a JSON object")
        rows.append(row)
        lines.append(number)
    return _rows_to_table(rows, lines, name), lines


def _without_timestamps(kind: pa.DataType) -> pa.DataType:
    """pyarrow.json reads ISO dates as timestamps; the manifest's text stays text, as json.loads has it."""
    if pa.types.is_timestamp(kind):
        return pa.string()
    if pa.types.is_struct(kind):
        return pa.struct([f.with_type(_without_timestamps(f.type)) for f in kind])
    if pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_without_timestamps(kind.value_type)))
    return kind


def _json_fast(chunk: bytes) -> pa.Table | None:
    options = pajson.ReadOptions(block_size=max(1 << 20, min(len(chunk) + 1, 4 << 20)))
    for attempt in range(2):
        try:
            table = pajson.read_json(io.BytesIO(chunk), read_options=options)
        except pa.ArrowInvalid as exc:
            if attempt == 0 and "straddl" in str(exc):  # a line longer than a parse block
                options = pajson.ReadOptions(block_size=len(chunk) + 1)
                continue
            return None
        break
    try:
        table.validate(full=True)  # pyarrow.json lets bytes that are not UTF-8 into string columns
    except pa.ArrowInvalid:
        return None
    schema = pa.schema([f.with_type(_without_timestamps(f.type)) for f in table.schema])
    if schema != table.schema:
        try:
            table = pajson.read_json(io.BytesIO(chunk), read_options=options,
                                     parse_options=pajson.ParseOptions(explicit_schema=schema))
        except pa.ArrowInvalid:
            return None
    return table


def _count_lines(chunk: bytes) -> int:
    """Lines as bytes.splitlines counts them (\\n, \\r, \\r\\n), for the next chunk's first line."""
    lines = chunk.count(b"\n")
    if b"\r" in chunk:
        lines += chunk.count(b"\r") - chunk.count(b"\r\n")
    return lines


def _json_blocks(fs, file: str, name: str, block_bytes: int) -> Iterator[_Block]:
    first_line = 1
    with fs.open(file, "rb") as handle:
        carry = b""
        while True:
            data = handle.read(block_bytes)
            chunk = carry + data
            if not data:
                carry = b""
            else:
                cut = chunk.rfind(b"\n") + 1
                if cut == 0:  # no line end yet: keep reading
                    carry = chunk
                    continue
                chunk, carry = chunk[:cut], chunk[cut:]
            if chunk:
                yield _json_block(chunk, first_line, name)
                first_line += _count_lines(chunk)
            if not data:
                return


_ODD_LINE_STARTS = (b"\n\n", b"\n ", b"\n\t", b"\n\x0b", b"\n\x0c", b"\r")


def _json_block(chunk: bytes, first_line: int, name: str) -> _Block:
    def line_numbers():
        padded = b"\n" + chunk
        if not any(odd in padded for odd in _ODD_LINE_STARTS):  # no blank line: one row a line
            return range(first_line, first_line + chunk.count(b"\n") + 1)
        return [n for n, raw in enumerate(chunk.splitlines(), start=first_line) if raw.strip()]

    return _Block(_json_fast(chunk), lambda: _json_slow(chunk, first_line, name), line_numbers)


# CSV

def _csv_line_numbers(fs, file: str, name: str, header_fields: int | None = None,
                      upto_row: int | None = None) -> list[int]:
    """The line each data row of a CSV file ends on, read with Python's csv module (the slow path);
    raises ManifestError naming the line of an undecodable byte or of a row with the wrong field count."""
    position = {"line": 0, "byte": 0}

    def text_lines():
        with fs.open(file, "rb") as handle:
            for raw in handle:  # split at b"\n" only, which never falls inside a UTF-8 character
                position["line"] += 1
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as exc:
                    raise ManifestError(f"{name} line {position['line']}: not valid UTF-8 "
                                        f"(byte {position['byte'] + exc.start})") from None
                position["byte"] += len(raw)
                yield text

    reader = csv.reader(text_lines())
    try:
        header = next(reader)
    except StopIteration:
        raise ManifestError(f"{name}: empty CSV file") from None
    width = header_fields or len(header)
    lines: list[int] = []
    for row in reader:
        if not row:
            continue
        if len(row) != width:
            raise ManifestError(f"{name} line {reader.line_num}: {len(row)} fields, the header has {width}")
        lines.append(reader.line_num)
        if upto_row is not None and len(lines) >= upto_row:
            break
    return lines


_CSV_CONVERSION = re.compile(r"In CSV column #(\d+): CSV conversion error to (\w+)")


def _csv_options(block_bytes: int, column_types: dict) -> dict:
    return {
        "read_options": pacsv.ReadOptions(block_size=block_bytes),
        "parse_options": pacsv.ParseOptions(newlines_in_values=True),
        "convert_options": pacsv.ConvertOptions(column_types=column_types, strings_can_be_null=True),
    }


def _csv_column_types(fs, file: str, name: str, block_bytes: int) -> dict:
    """Column types for a CSV file read in several blocks, so every block reads the same types.

    pyarrow infers a streamed file's types from its first block; a later value that does not fit
    (a number column with a word in row 900,000) widens that column (int -> double -> string) and the
    file is read again, as a whole-file inference would have it.
    """
    forced = {column: pa.string() for column in KNOWN_COLUMNS + ("reference",)}
    if fs.size(file) <= block_bytes:
        return forced
    for _ in range(64):
        try:
            with fs.open(file, "rb") as handle:
                reader = pacsv.open_csv(handle, **_csv_options(block_bytes, forced))
                schema = reader.schema
                for _batch in reader:
                    pass
            return {**{f.name: f.type for f in schema}, **forced}
        except pa.ArrowInvalid as exc:
            match = _CSV_CONVERSION.search(str(exc))
            if not match:
                _csv_line_numbers(fs, file, name)  # names the line of a malformed row
                raise ManifestError(f"{name}: {exc}") from None
            column = schema.field(int(match.group(1)))
            widened = pa.float64() if pa.types.is_integer(column.type) else pa.string()
            forced[column.name] = widened
    raise ManifestError(f"{name}: column types would not settle")  # pragma: no cover - 64 widenings


def _csv_blocks(fs, file: str, name: str, block_bytes: int) -> Iterator[_Block]:
    types = _csv_column_types(fs, file, name, block_bytes)
    handle = fs.open(file, "rb")
    try:
        try:
            reader = pacsv.open_csv(handle, **_csv_options(block_bytes, types))
        except pa.ArrowInvalid as exc:
            if "Empty CSV" in str(exc):
                raise ManifestError(f"{name}: empty CSV file") from None
            _csv_line_numbers(fs, file, name)
            raise ManifestError(f"{name}: {exc}") from None
        width = len(reader.schema)
        done = 0
        while True:
            try:
                batch = reader.read_next_batch()
            except StopIteration:
                return
            except pa.ArrowInvalid as exc:
                _csv_line_numbers(fs, file, name, width)  # raises with the line when it can find one
                raise ManifestError(f"{name}: {exc}") from None
            table = pa.Table.from_batches([batch])
            if any(pa.types.is_binary(f.type) for f in table.schema):  # bytes that are not UTF-8
                _csv_line_numbers(fs, file, name, width)
            start = done
            done += table.num_rows

            def line_numbers(start=start, rows=table.num_rows) -> list[int]:
                return _csv_line_numbers(fs, file, name, width, upto_row=start + rows)[start:]

            yield _Block(table, lambda table=table, lines=line_numbers: (table, lines()), line_numbers)
    finally:
        handle.close()


# Parquet

def _parquet_blocks(fs, file: str, name: str, block_bytes: int) -> Iterator[_Block]:
    try:
        handle = fs.open(file, "rb")
        # Not pre-buffered: pyarrow 26 then keeps every row group read so far (a 1 GB manifest of
        # embedded audio: 1.2 GB resident instead of 0.2 GB); buffered reads stream it instead.
        parquet = pq.ParquetFile(handle, pre_buffer=False, buffer_size=1 << 20)
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"{name}: not a readable Parquet file ({exc})") from None
    with handle:
        done = 0
        try:
            for batch in parquet.iter_batches(batch_size=_parquet_batch_rows(parquet, block_bytes)):
                table = pa.Table.from_batches([batch])
                start = done
                done += table.num_rows
                lines = list(range(start + 1, done + 1))
                yield _Block(table, lambda table=table, lines=lines: (table, lines), lambda lines=lines: lines,
                             where="row")
        except (pa.ArrowInvalid, OSError) as exc:
            raise ManifestError(f"{name}: not a readable Parquet file ({exc})") from None


def _parquet_batch_rows(parquet: pq.ParquetFile, block_bytes: int) -> int:
    """Rows per block: PARQUET_BLOCK_ROWS, fewer when rows are large (embedded audio), so a block
    holds about `block_bytes` of them, not 131,072 recordings. The row groups' sizes say how large
    rows are, and the first 16 rows as read (dictionary-encoded bytes are small on disk only)."""
    metadata = parquet.metadata
    sizes = [metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)]
    per_row = sum(sizes) / max(1, metadata.num_rows)
    probe = next(parquet.iter_batches(batch_size=16), None)
    if probe is not None and probe.num_rows:
        per_row = max(per_row, probe.nbytes / probe.num_rows)
    return max(1, min(PARQUET_BLOCK_ROWS, int(block_bytes // max(1.0, per_row))))


_BLOCK_READERS = {"json": _json_blocks, "csv": _csv_blocks, "parquet": _parquet_blocks}


# --- normalisation, vectorised ----------------------------------------------------------------------

class _Where:
    """Names a row of a block in errors; without line numbers, asks for the slow path instead."""

    def __init__(self, name: str, kind: str, lines: list[int] | None):
        self.name, self.kind, self.lines = name, kind, lines

    def fail(self, index: int, message: str):
        if self.lines is None:
            raise _SlowPath()
        raise ManifestError(f"{self.name} {self.kind} {self.lines[index]}: {message}")


def _first_valid(array) -> int:
    return pc.index(pc.is_valid(array), True).as_py()


def _type_name(kind: pa.DataType) -> str:
    """An Arrow type named as the slow path names a JSON value's type."""
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        return "str"
    if pa.types.is_integer(kind) or pa.types.is_floating(kind):
        return "float"
    if pa.types.is_boolean(kind):
        return "bool"
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return "list"
    if pa.types.is_struct(kind):
        return "dict"
    return str(kind)


def _value_bytes(array: pa.Array) -> np.ndarray:
    """Each string's length in bytes, from its offsets."""
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset: array.offset + len(array) + 1]
    return np.diff(offsets)


def _strip_or_null(array: pa.Array) -> pa.Array:
    """Surrounding whitespace removed; empty (or blank) values become null."""
    stripped = pc.utf8_trim_whitespace(array)
    lengths = _value_bytes(stripped)
    if lengths.sum() == _value_bytes(array).sum() and (len(lengths) == 0 or lengths.min() > 0):
        return array  # the common case: nothing to strip, nothing empty
    return pc.if_else(pc.equal(stripped, ""), pa.scalar(None, pa.string()), stripped)


def _text_column(table: pa.Table, column: str, where: _Where, strip: bool = True) -> pa.Array | None:
    if column not in table.column_names:
        return None
    array = table.column(column).combine_chunks()
    kind = array.type
    if pa.types.is_null(kind):
        return pa.nulls(len(array), pa.string())
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_integer(kind)):
        where.fail(_first_valid(array), f"field {column!r} must be a string or an integer, not {_type_name(kind)}")
    array = array.cast(pa.string())
    return _strip_or_null(array) if strip else array


def _clean_keyword_lists(lists: pa.Array) -> pa.Array:
    """Each list's items trimmed, empty and null items dropped; null lists become empty ones."""
    if lists.null_count:  # list_flatten skips what a null slot spans, list_parent_indices does not
        lists = pc.if_else(pc.is_null(lists), pa.scalar([], lists.type), lists)
    values = pc.utf8_trim_whitespace(pc.list_flatten(lists).cast(pa.string()))
    parents = pc.list_parent_indices(lists)
    keep = pc.fill_null(pc.not_equal(values, ""), False)
    counts = np.bincount(parents.filter(keep).to_numpy(zero_copy_only=False), minlength=len(lists))
    offsets = np.zeros(len(lists) + 1, dtype=np.int32)
    np.cumsum(counts, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), values.filter(keep))


def _keywords_column(table: pa.Table, n: int, where: _Where, default: tuple[str, ...]) -> pa.Array:
    default_list = pa.scalar(list(default), pa.list_(pa.string()))
    if "keywords" not in table.column_names:
        return pa.array([list(default)] * n, pa.list_(pa.string())) if default else \
            pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()))
    array = table.column("keywords").combine_chunks()
    kind = array.type
    if pa.types.is_null(kind):
        return _keywords_column(table.drop_columns(["keywords"]), n, where, default)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        lists = pc.split_pattern(array.cast(pa.string()), ",")
    elif (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
            pa.types.is_string(kind.value_type) or pa.types.is_large_string(kind.value_type)
            or pa.types.is_null(kind.value_type)):
        lists = array
    else:
        return where.fail(_first_valid(array), "field 'keywords' must be a list of strings or one "
                          f"comma-separated string, not {_type_name(kind)}")
    cleaned = _clean_keyword_lists(lists)
    return pc.if_else(pc.is_null(lists), default_list, cleaned) if default else cleaned


def _audio_columns(table: pa.Table, where: _Where) -> tuple[pa.Array | None, pa.Array]:
    """(names or URIs, embedded bytes) of the `audio` column: a string (a URI or path), bytes (the
    recording itself) or Hugging Face's `Audio` struct<bytes, path> (bytes, named by their path; a
    row with null bytes is read from its path). That struct is how `datasets` stores an `Audio`
    feature in Arrow and Parquet (its `Audio.pa_type`), so a leaderboard test set's Parquet files
    are manifests as they are."""
    n = table.num_rows
    no_bytes = pa.nulls(n, pa.large_binary())
    if "audio" not in table.column_names:
        return None, no_bytes
    array = table.column("audio").combine_chunks()
    kind = array.type
    if pa.types.is_binary(kind) or pa.types.is_large_binary(kind):
        return pa.nulls(n, pa.string()), array.cast(pa.large_binary())
    if pa.types.is_struct(kind):
        names = {kind.field(i).name for i in range(kind.num_fields)}
        if not names & {"bytes", "path"}:
            where.fail(_first_valid(array), "field 'audio' is a struct without 'bytes' or 'path'")
        fields = dict(zip([kind.field(i).name for i in range(kind.num_fields)], array.flatten()))
        path = fields.get("path", pa.nulls(n, pa.string()))
        data = fields.get("bytes", no_bytes)
        if not (pa.types.is_string(path.type) or pa.types.is_large_string(path.type) or pa.types.is_null(path.type)):
            where.fail(_first_valid(path), f"field 'audio.path' must be a string, not {_type_name(path.type)}")
        if not (pa.types.is_binary(data.type) or pa.types.is_large_binary(data.type) or pa.types.is_null(data.type)):
            where.fail(_first_valid(data), f"field 'audio.bytes' must be bytes, not {_type_name(data.type)}")
        return _strip_or_null(path.cast(pa.string())), data.cast(pa.large_binary())
    return _text_column(table, "audio", where), no_bytes


def _embedded_names(names: pa.Array, data: pa.Array) -> pa.Array:
    """Embedded audio's source names: its path, or for bytes without one a digest of the bytes
    (`embedded:<sha256>`), so the default id stays the same in every run."""
    missing = pc.and_(pc.is_null(names), pc.is_valid(data))
    if not pc.any(missing).as_py():
        return names
    rows = pc.indices_nonzero(missing)
    digests = [EMBEDDED_PREFIX + hashlib.sha256(value.as_buffer()).hexdigest()[:32]
               for value in data.take(rows)]
    return pc.replace_with_mask(names, missing, pa.array(digests, pa.string()))


def _channels_column(table: pa.Table, n: int, where: _Where, default: str) -> tuple[pa.Array, pa.Array]:
    """(channels, error): `mix` or `split` per row (the job's default where empty); another value is
    that row's error."""
    array = _text_column(table, "channels", where)
    if array is None or array.null_count == n:
        return pa.array([default] * n, pa.string()), pa.nulls(n, pa.string())
    array = pc.fill_null(pc.utf8_lower(array), default)
    bad = pc.invert(pc.is_in(array, value_set=pa.array(CHANNEL_MODES)))
    errors = pc.if_else(bad, pc.binary_join_element_wise(
        pa.scalar("unsupported channels '"), array, pa.scalar("'; use mix or split"), ""), pa.scalar(None, pa.string()))
    return array, errors


def _resolve_audio(audio: pa.Array, base: str, protocol: str) -> pa.Array:
    """Relative paths are relative to the manifest's folder; URIs and absolute paths stay."""
    local = protocol in LOCAL_PROTOCOLS
    has_scheme = pc.match_substring(audio, "://")
    absolute = pc.starts_with(audio, "/")
    relative = pc.invert(pc.or_(has_scheme, absolute))
    resolved = audio
    if pc.any(relative).as_py():
        prefix = (base.rstrip("/") + "/") if base else ""
        if base == "/":
            prefix = "/"
        joined = pc.binary_join_element_wise(pa.scalar(prefix), audio, "")
        # Only paths with `.`/`..` parts, doubled or trailing slashes need posixpath.normpath.
        odd = pc.and_(relative, pc.match_substring_regex(audio, r"(^|/)\.\.?(/|$)|//|/$"))
        if pc.any(odd).as_py():
            indices = pc.indices_nonzero(odd)
            fixed = [posixpath.normpath(posixpath.join(base, path))
                     for path in pc.take(audio, indices).to_pylist()]
            joined = pc.replace_with_mask(joined, odd, pa.array(fixed, pa.string()))
        if not local:
            joined = pc.binary_join_element_wise(pa.scalar(f"{protocol}://"), joined, "")
        resolved = pc.if_else(relative, joined, resolved)
    if not local and pc.any(absolute).as_py():
        remote = pc.binary_join_element_wise(pa.scalar(f"{protocol}://"), pc.utf8_ltrim(audio, "/"), "")
        resolved = pc.if_else(pc.and_(absolute, pc.invert(has_scheme)), remote, resolved)
    return resolved


def _as_str(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _request_columns(table: pa.Table, where: _Where, defaults: Defaults) -> tuple[pa.Array, ...]:
    """(language, task, target_language, error) of every row.

    A manifest has few distinct (language, task, target_language) triples, so each distinct triple
    is normalised and checked once in Python and spread back to its rows.
    """
    n = table.num_rows
    dictionaries: list[list] = []
    combined = np.zeros(n, np.int64)
    history: list[tuple[np.ndarray, int]] = []  # per step: the distinct combined codes, the column's size
    for step, column in enumerate(("language", "task", "target_language")):
        array = _text_column(table, column, where, strip=False)
        if array is None:
            dictionaries.append([None])
            indices, size = np.zeros(n, np.int64), 1
        else:
            encoded = pc.dictionary_encode(array, null_encoding="encode")
            dictionaries.append(encoded.dictionary.to_pylist())
            indices, size = encoded.indices.to_numpy(zero_copy_only=False).astype(np.int64), len(encoded.dictionary)
        if step == 0:
            combined = indices
            continue
        # Re-encoded at each step, so the codes stay below rows * size, far from overflowing.
        encoded = pc.dictionary_encode(pa.array(combined * size + indices))
        history.append((encoded.dictionary.to_numpy(), size))
        combined = encoded.indices.to_numpy(zero_copy_only=False)

    columns: list[list] = [[], [], [], []]
    for unique in range(len(history[-1][0])):
        code, picks = unique, []
        for distinct, size in reversed(history):
            code, pick = divmod(int(distinct[code]), size)
            picks.append(pick)
        picks.append(code)
        raw_language, raw_task, raw_target = (d[i] for d, i in zip(dictionaries, reversed(picks)))
        language = (_as_str(raw_language) or defaults.language).lower()
        task = (_as_str(raw_task) or defaults.task).lower()
        target = _as_str(raw_target)
        if target is None and task == "ast":
            target = defaults.target_language
        if task == "asr":
            target = None
        target = target.lower() if target else None
        error = check_request(language, task, target)
        # Requests the model card does not list are served, with a warning and their count.
        note = None if error else unlisted_request(language, task, target, ())
        if note:
            log.warning("%s: %d row(s): %s", where.name, int(np.count_nonzero(combined == unique)), note)
        if language not in ASR_LANGUAGES and not (language == AUTO_LANGUAGE and error is None):
            # Keeps the partition path safe; the error names the value. An `auto` row keeps `auto`
            # until its transcript is identified (language_id.identify_recordings).
            language = UNDETERMINED_LANGUAGE
        for values, value in zip(columns, (language, task, target, error)):
            values.append(value)
    rows = pa.array(combined)
    return tuple(pa.array(values, pa.string()).take(rows) for values in columns)


def _normalise(table: pa.Table, where: _Where, base: str, protocol: str, defaults: Defaults
               ) -> tuple[pa.Table, int]:
    """The block's rows in the normalised schema, and how many had an empty id replaced."""
    n = table.num_rows
    audio, data = _audio_columns(table, where)
    if audio is None:  # a later block where no row has the column
        where.fail(0, "field 'audio' is missing or empty")
    embedded = pc.is_valid(data)
    missing_audio = pc.and_(pc.is_null(audio), pc.invert(embedded))
    if pc.any(missing_audio).as_py():
        where.fail(pc.index(missing_audio, True).as_py(), "field 'audio' is missing or empty")
    if data.null_count == n:
        audio = _resolve_audio(audio, base, protocol)
    else:  # embedded audio keeps its path as its name (HF's `Audio` layout); the rest are read from storage
        audio = pc.if_else(embedded, _embedded_names(audio, data), _resolve_audio(audio, base, protocol))

    language, task, target, error = _request_columns(table, where, defaults)
    keywords = _keywords_column(table, n, where, defaults.keywords)
    keyworded_translations = pc.sum(pc.and_(pc.and_(pc.equal(task, "ast"), pc.is_null(error)),
                                            pc.greater(pc.list_value_length(keywords), 0))).as_py()
    if keyworded_translations:
        log.warning("%s: %d row(s): %s", where.name, keyworded_translations,
                    unlisted_request("en", "ast", "fr", ("keyword",)))

    channels, channels_error = _channels_column(table, n, where, defaults.channels)
    error = pc.coalesce(error, channels_error)

    if defaults.allowed_prefixes:  # embedded audio is read from nowhere: no prefix applies to it
        refused = [None if e is not None or inside or is_allowed(a, defaults.allowed_prefixes)
                   else f"not allowed: {a} is outside the allowed prefixes"
                   for a, e, inside in zip(audio.to_pylist(), error.to_pylist(), embedded.to_pylist())]
        error = pc.coalesce(error, pa.array(refused, pa.string()))

    ids = _text_column(table, "id", where)
    replaced = 0 if ids is None else ids.null_count
    if ids is None:
        ids = pa.nulls(n, pa.string())
    if ids.null_count:
        missing = pc.is_null(ids)
        rows = pc.indices_nonzero(missing)
        digests = [default_id(a, t, g, k) for a, t, g, k in zip(
            audio.take(rows).to_pylist(), task.take(rows).to_pylist(), target.take(rows).to_pylist(),
            keywords.take(rows).to_pylist())]
        ids = pc.replace_with_mask(ids, missing, pa.array(digests, pa.string()))

    passthrough = [f for f in table.schema if f.name not in KNOWN_COLUMNS]
    arrays = [ids, audio, language, task, target, keywords, error, data, channels]
    arrays += [table.column(f.name) for f in passthrough]
    return pa.Table.from_arrays(arrays, schema=normalised_schema(passthrough)), replaced


def _as_reference(table: pa.Table, column: str | None, name: str) -> pa.Table:
    """`table` with `column` renamed `reference` (the job's `reference_column`)."""
    if not column or column == "reference" or column not in table.column_names:
        return table
    if "reference" in table.column_names:
        raise ManifestError(f"{name}: has both 'reference' and the reference column {column!r}; keep one")
    return table.rename_columns(["reference" if c == column else c for c in table.column_names])


def _check_columns(table: pa.Table, name: str, first_block: bool) -> None:
    if first_block and "audio" not in table.column_names:
        raise ManifestError(f"{name}: missing required column 'audio'")
    reserved = [column for column in RESERVED_COLUMNS if column in table.column_names]
    if reserved:
        hint = " (reference texts: --reference-column text)" if reserved[0] == "text" else ""
        raise ManifestError(f"{name}: column {reserved[0]!r} is reserved for the output; rename it{hint}")


# --- the stream ----------------------------------------------------------------------------------

class ManifestStream:
    """The normalised rows of a manifest (a file, a folder or prefix of files, or a listing of
    recordings), yielded one block at a time, in manifest order.

    Iterating reads every file once; afterwards `rows_in`, `ids_replaced` and `schema` (the
    contract's columns and every passthrough column, their types unified over all blocks) describe
    what was read. Duplicate ids are not removed here (see `first_of_each_id` and plan.py).
    """

    def __init__(self, uri: str, defaults: Defaults, storage_options: dict | None = None, *,
                 listing: bool = False, block_bytes: int = BLOCK_BYTES, listing_rows: int = 100_000):
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
        self._passthrough: dict[str, tuple[pa.Field, tuple[str, str] | None]] = {}  # name -> (field, where first non-null)

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
                    out, replaced = _normalise(table, _Where(name, block.where, lines),
                                               posixpath.dirname(path), self.protocol, self.defaults)
                except _SlowPath:
                    table, lines = block.slow()
                    table = _as_reference(table, self.defaults.reference_column, name)
                    _check_columns(table, name, first)
                    out, replaced = _normalise(table, _Where(name, block.where, lines),
                                               posixpath.dirname(path), self.protocol, self.defaults)
                first = False
                self._unify(out, name, block, lines)
                self.rows_in += out.num_rows
                self.ids_replaced += replaced
                yield out

    def _unify(self, table: pa.Table, name: str, block: _Block, lines: list[int] | None) -> None:
        """Fold the block's passthrough types into the stream's; a clash names the column and two lines."""
        for column in table.schema.names[len(NORMALISED_FIELDS):]:
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
                here_name, here_line = self._where_first(table, column, name, block, lines)
                this, that = _type_name(new.type), _type_name(old.type)
                if (this, that) == ("dict", "dict") or (this, that) == ("list", "list"):
                    this, that = str(new.type), str(old.type)
                there = old_where[1] if old_where[0] == here_name else f"{old_where[0]} {old_where[1]}"
                raise ManifestError(f"{here_name}: {here_line}: field {column!r} is {this}, "
                                    f"but {there} has {that}") from None
            self._passthrough[column] = (merged.field(column), old_where)

    @staticmethod
    def _where_first(table: pa.Table, column: str, name: str, block: _Block,
                     lines: list[int] | None) -> tuple[str, str] | None:
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
                else:
                    try:
                        for member, data, sidecar in iter_samples(self.fs, path, AUDIO_SUFFIXES, uri):
                            columns = {k: v for k, v in sidecar.items() if k != "audio"}
                            columns.setdefault("language", path_language)
                            rows.append({**columns, "audio": {"bytes": data, "path": member_uri(uri, member)}})
                            held_bytes += len(data)
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
    return Manifest(
        table=unique,
        rows_in=stream.rows_in,
        duplicates=combined.num_rows - unique.num_rows,
        files=stream.files,
        passthrough=stream.passthrough,
        ids_replaced=stream.ids_replaced,
    )


AUDIO_SUFFIXES = (".wav", ".flac", ".mp3", ".ogg", ".opus", ".oga", ".m4a", ".aac", ".mp4", ".m4v", ".mkv",
                  ".webm", ".mov", ".wma", ".aif", ".aiff", ".amr", ".3gp")
_GLOB_CHARS = "*?[{"


def _glob_regex(pattern: str) -> re.Pattern:
    """`**` any depth, `*`/`?` within one folder, `{language}` one folder name captured as the language."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("{language}", i):
            out.append(r"(?P<language>[^/]+)")
            i += len("{language}")
        elif pattern.startswith("**/", i):
            out.append(r"(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(r".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^/]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _iter_listing(fs, pattern: str, sizes: bool = False):
    """Yield (path, language or None) for each recording matching `pattern`, folder by folder;
    with `sizes`, (path, language, bytes)."""
    has_glob = any(ch in pattern for ch in _GLOB_CHARS)
    if not has_glob and is_shard(pattern) and fs.isfile(pattern):  # one shard, listed alone
        yield (pattern, None, fs.size(pattern)) if sizes else (pattern, None)
        return
    if not has_glob:
        pattern = pattern.rstrip("/") + "/**"
    root = pattern[: min((pattern.find(ch) for ch in _GLOB_CHARS if ch in pattern), default=len(pattern))]
    root = root.rsplit("/", 1)[0] if "/" in root else root
    matcher = _glob_regex(pattern)
    # fs.walk lists one folder at a time, so a prefix with millions of keys is never held whole.
    for folder, _, names in fs.walk(root, detail=sizes):
        for name in sorted(names):
            path = posixpath.join(folder, name)
            match = matcher.match(path)
            if match and (has_glob or posixpath.splitext(name)[1].lower() in AUDIO_SUFFIXES + TAR_SUFFIXES):
                language = match.groupdict().get("language")
                yield (path, language, names[name].get("size") or 0) if sizes else (path, language)


def list_recordings(uri: str, defaults: Defaults, storage_options: dict | None = None,
                    chunk_rows: int = 100_000) -> Manifest:
    """Build the manifest by listing `uri` (a prefix or glob; `{language}` takes it from the path)."""
    stream = ManifestStream(uri, defaults, storage_options, listing=True, listing_rows=chunk_rows)
    return _collect(stream, dedupe=False)
