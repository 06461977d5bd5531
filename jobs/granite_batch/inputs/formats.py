"""Block readers of JSON Lines, CSV and Parquet manifests: fast Arrow paths, and slow
paths that name the line and field of whatever the fast path refused.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq

from granite_batch.inputs.rows import KNOWN_COLUMNS, TEXT_COLUMNS, ManifestError
from granite_batch.schema import FLAG_COLUMNS

BLOCK_BYTES = 16 << 20  # text read per block: ~100,000 rows of a typical JSON Lines manifest


PARQUET_BLOCK_ROWS = 131_072


class _SlowPath(Exception):
    """The fast path cannot name the line of a problem: read the block again one line at a time."""


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
    return type(value).__name__  # int and float share a column, but a message names what the line holds


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
        return f"line {lines[high]}: field {column!r} is a {_python_kind(bad)} whose items cannot share one type"
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
    kind = (
        _python_kind(value)
        if not isinstance(value, list)
        else "a list holding "
        + ", ".join(sorted({_python_kind(part) for part in value if part is not None and not isinstance(part, str)}))
    )
    raise ManifestError(
        f"{where}: field 'keywords' must be a list of strings or one comma-separated string, not {kind}"
    )


def _flag_text(value) -> str | None:
    """A per-row flag as text, so that a row whose flag is no boolean does not refuse the manifest
    (inference/routing.py reads "true"/"false" and makes any other value that row's error)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value) if isinstance(value, (list, dict)) else str(value)


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
        elif column in FLAG_COLUMNS and any(v is not None and not isinstance(v, bool) for v in values):
            array = pa.array(
                [_flag_text(v) for v in values], pa.string()
            )  # a value that is no boolean: its row's error
        else:
            try:
                array = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                raise ManifestError(f"{name}: {_value_conflict(values, lines, column) or exc}") from None
        arrays.append(array)
        names.append(column)
    return pa.Table.from_arrays(arrays, names=names) if names else pa.table({})


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
            table = pajson.read_json(
                io.BytesIO(chunk), read_options=options, parse_options=pajson.ParseOptions(explicit_schema=schema)
            )
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


def _csv_line_numbers(
    fs, file: str, name: str, header_fields: int | None = None, upto_row: int | None = None
) -> list[int]:
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
                    raise ManifestError(
                        f"{name} line {position['line']}: not valid UTF-8 (byte {position['byte'] + exc.start})"
                    ) from None
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
                yield _Block(
                    table, lambda table=table, lines=lines: (table, lines), lambda lines=lines: lines, where="row"
                )
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
