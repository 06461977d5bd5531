"""Read and validate an audio manifest (JSON Lines, CSV or Parquet; a file, folder or prefix).

Schema problems stop the job before any work, with an error naming the file, line/row and field.
Value problems (unsupported language, pair or task) become the row's `error` and the row goes on.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import posixpath
import re
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from granite_batch.prompts import ASR_LANGUAGES, check_request, unlisted_request
from granite_batch.storage import LOCAL_PROTOCOLS, filesystem, protocol_of, uri_of

log = logging.getLogger(__name__)

MANIFEST_SUFFIXES = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
KNOWN_COLUMNS = ("id", "audio", "language", "task", "target_language", "keywords")
# Output columns a manifest may not carry: they would be silently overwritten.
RESERVED_COLUMNS = ("text", "segments", "duration_s", "error", "model", "model_revision", "run_id")
UNDETERMINED_LANGUAGE = "und"


class ManifestError(ValueError):
    """The manifest cannot be used; the message names the file, line/row and field."""


@dataclass(frozen=True)
class Defaults:
    """Job-level values for columns a row leaves empty."""

    language: str = "en"
    task: str = "asr"
    target_language: str | None = None
    keywords: tuple[str, ...] = ()
    allowed_prefixes: tuple[str, ...] = ()  # when set, recordings elsewhere become error rows

    @classmethod
    def from_config(cls, config) -> "Defaults":
        """The defaults a job config (`config.JobConfig`) gives rows."""
        return cls(config.language, config.task, config.target_language, tuple(config.keywords),
                   tuple(config.allowed_prefixes))


@dataclass
class Manifest:
    """The validated units of work: one row per distinct id."""

    table: pa.Table
    rows_in: int
    duplicates: int
    files: list[str]
    passthrough: list[str] = field(default_factory=list)


def _canonical(uri: str) -> str:
    """A URI with `..`, symlinks (local files) and scheme aliases resolved, for prefix checks."""
    protocol = protocol_of(uri)
    if protocol in LOCAL_PROTOCOLS:
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return os.path.realpath(path)
    path = uri.split("://", 1)[1] if "://" in uri else uri
    return f"{protocol}://{posixpath.normpath('/' + path).lstrip('/')}"


def is_allowed(uri: str, prefixes: tuple[str, ...]) -> bool:
    """Whether `uri` lies under one of `prefixes` (whole path components; no prefixes allows all)."""
    if not prefixes:
        return True
    target = _canonical(uri)
    for prefix in prefixes:
        base = _canonical(prefix).rstrip("/")
        if target == base or target.startswith(base + "/"):
            return True
    return False


def default_id(audio: str, task: str, target_language: str | None, keywords: list[str]) -> str:
    """A digest of what the row asks for, identical in every run."""
    key = json.dumps([audio, task, target_language, list(keywords)], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


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


def _read_json_lines(data: bytes, name: str) -> tuple[pa.Table, list[int]]:
    rows: list[dict] = []
    line_numbers: list[int] = []
    for number, raw in enumerate(data.splitlines(), start=1):
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
        line_numbers.append(number)
    try:
        # pa.array infers one struct type over every row (from_pylist would use the first row's keys).
        table = pa.Table.from_struct_array(pa.array(rows)) if rows else pa.table({})
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise ManifestError(f"{name}: {_column_type_conflict(rows, line_numbers) or exc}") from None
    return table, line_numbers


def _column_type_conflict(rows: list[dict], line_numbers: list[int]) -> str | None:
    """Find the first line whose value's type disagrees with an earlier line's, for the error."""
    seen: dict[str, tuple[type, int]] = {}
    for row, number in zip(rows, line_numbers):
        for key, value in row.items():
            if value is None:
                continue
            kind = type(value) if not isinstance(value, (int, float)) or isinstance(value, bool) else float
            if key in seen and seen[key][0] is not kind:
                return (
                    f"line {number}: field {key!r} is {type(value).__name__}, "
                    f"but line {seen[key][1]} has {seen[key][0].__name__}"
                )
            seen.setdefault(key, (kind, number))
    return None


def _read_csv(data: bytes, name: str) -> tuple[pa.Table, list[int]]:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ManifestError(f"{name} line {line}: not valid UTF-8 (byte {exc.start})") from None
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader)
    except StopIteration:
        raise ManifestError(f"{name}: empty CSV file") from None
    line_numbers: list[int] = []
    for row in reader:
        if not row:
            continue
        if len(row) != len(header):
            raise ManifestError(
                f"{name} line {reader.line_num}: {len(row)} fields, the header has {len(header)}"
            )
        line_numbers.append(reader.line_num)
    string_columns = {column: pa.string() for column in KNOWN_COLUMNS + ("reference",) if column in header}
    try:
        table = pacsv.read_csv(
            io.BytesIO(data),
            parse_options=pacsv.ParseOptions(newlines_in_values=True),
            convert_options=pacsv.ConvertOptions(column_types=string_columns, strings_can_be_null=True),
        )
    except pa.ArrowInvalid as exc:
        raise ManifestError(f"{name}: {exc}") from None
    return table, line_numbers


def _read_parquet(data: bytes, name: str) -> tuple[pa.Table, list[int]]:
    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as exc:
        raise ManifestError(f"{name}: not a readable Parquet file ({exc})") from None
    return table, list(range(1, table.num_rows + 1))


_READERS = {"json": _read_json_lines, "csv": _read_csv, "parquet": _read_parquet}


def _where(name: str, kind: str, number: int) -> str:
    return f"{name} {'row' if kind == 'parquet' else 'line'} {number}"


def _check_schema(table: pa.Table, name: str) -> None:
    if "audio" not in table.column_names:
        raise ManifestError(f"{name}: missing required column 'audio'")
    reserved = [column for column in RESERVED_COLUMNS if column in table.column_names]
    if reserved:
        raise ManifestError(f"{name}: column {reserved[0]!r} is reserved for the output; rename it")
    for column in ("id", "audio", "language", "task", "target_language"):
        if column in table.column_names:
            kind = table.schema.field(column).type
            if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
                    or pa.types.is_integer(kind)):
                raise ManifestError(f"{name}: field {column!r} must be a string, not {kind}")
    if "keywords" in table.column_names:
        kind = table.schema.field("keywords").type
        is_text = pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)
        is_list = pa.types.is_list(kind) and (
            pa.types.is_string(kind.value_type) or pa.types.is_null(kind.value_type)
        )
        if not (is_text or is_list):
            raise ManifestError(f"{name}: field 'keywords' must be a list of strings or one string, not {kind}")


def _as_str(value) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _resolve_audio(audio: str, base: str, protocol: str) -> str:
    """Relative paths are relative to the manifest's folder; URIs and absolute paths stay."""
    if "://" in audio:
        return audio
    if audio.startswith("/"):
        return audio if protocol in LOCAL_PROTOCOLS else f"{protocol}://{audio.lstrip('/')}"
    joined = posixpath.normpath(posixpath.join(base, audio))
    return joined if protocol in LOCAL_PROTOCOLS else f"{protocol}://{joined}"


def _keywords(value, default: tuple[str, ...]) -> list[str]:
    if value is None:
        return list(default)
    parts = value.split(",") if isinstance(value, str) else value
    return [part.strip() for part in parts if part is not None and part.strip()]


def read_manifest(uri: str, defaults: Defaults, storage_options: dict | None = None) -> Manifest:
    """Read every manifest file under `uri`, validate it and apply the job's defaults."""
    fs, path = filesystem(uri, storage_options)
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    files = _list_manifest_files(fs, path)

    tables: list[pa.Table] = []
    normalised_rows = 0
    for file in files:
        kind = MANIFEST_SUFFIXES[posixpath.splitext(file)[1].lower()]
        name = uri_of(fs, file)
        with fs.open(file, "rb") as handle:
            data = handle.read()
        table, line_numbers = _READERS[kind](data, name)
        if table.num_rows == 0:
            continue
        _check_schema(table, name)
        tables.append(_normalise(table, line_numbers, name, kind, posixpath.dirname(file), protocol, defaults))
        normalised_rows += table.num_rows
    if not tables:
        raise ManifestError(f"{uri}: the manifest has no rows")

    combined = pa.concat_tables(tables, promote_options="permissive")
    unique = _first_of_each_id(combined)
    passthrough = [c for c in combined.column_names if c not in KNOWN_COLUMNS + ("error",)]
    return Manifest(
        table=unique,
        rows_in=normalised_rows,
        duplicates=combined.num_rows - unique.num_rows,
        files=[uri_of(fs, f) for f in files],
        passthrough=passthrough,
    )


def _normalise(table, line_numbers, name, kind, base, protocol, defaults: Defaults) -> pa.Table:
    columns = {column: table.column(column).to_pylist() if column in table.column_names else None
               for column in KNOWN_COLUMNS}
    n = table.num_rows
    out = {key: [] for key in ("id", "audio", "language", "task", "target_language", "keywords", "error")}
    notes: dict[str, int] = {}  # requests the model card does not list: served, with a warning
    for i in range(n):
        audio = _as_str(columns["audio"][i])
        if audio is None:
            raise ManifestError(f"{_where(name, kind, line_numbers[i])}: field 'audio' is missing or empty")
        audio = _resolve_audio(audio, base, protocol)
        language = (_as_str(columns["language"][i]) if columns["language"] else None) or defaults.language
        language = language.lower()
        task = ((_as_str(columns["task"][i]) if columns["task"] else None) or defaults.task).lower()
        target = _as_str(columns["target_language"][i]) if columns["target_language"] else None
        if target is None and task == "ast":
            target = defaults.target_language
        if task == "asr":
            target = None
        target = target.lower() if target else None
        keywords = _keywords(columns["keywords"][i] if columns["keywords"] else None, defaults.keywords)
        row_id = _as_str(columns["id"][i]) if columns["id"] else None
        error = check_request(language, task, target)
        note = None if error else unlisted_request(language, task, target, keywords)
        if note:
            notes[note] = notes.get(note, 0) + 1
        if error is None and not is_allowed(audio, defaults.allowed_prefixes):
            error = f"not allowed: {audio} is outside the allowed prefixes"
        if language not in ASR_LANGUAGES:
            language = UNDETERMINED_LANGUAGE  # keeps the partition path safe; the error names the value
        out["id"].append(row_id or default_id(audio, task, target, keywords))
        out["audio"].append(audio)
        out["language"].append(language)
        out["task"].append(task)
        out["target_language"].append(target)
        out["keywords"].append(keywords)
        out["error"].append(error)
    schema = pa.schema([
        ("id", pa.string()), ("audio", pa.string()), ("language", pa.string()), ("task", pa.string()),
        ("target_language", pa.string()), ("keywords", pa.list_(pa.string())), ("error", pa.string()),
    ])
    for note, count in notes.items():
        log.warning("%s: %d row(s): %s", name, count, note)
    normalised = pa.Table.from_pydict(out, schema=schema)
    for column in table.column_names:
        if column not in KNOWN_COLUMNS:
            normalised = normalised.append_column(table.schema.field(column), table.column(column))
    return normalised


def _first_of_each_id(table: pa.Table) -> pa.Table:
    seen: set[str] = set()
    keep: list[int] = []
    for index, row_id in enumerate(table.column("id").to_pylist()):
        if row_id not in seen:
            seen.add(row_id)
            keep.append(index)
    return table if len(keep) == table.num_rows else table.take(keep)


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


def _iter_listing(fs, pattern: str):
    """Yield (path, language or None) for each recording matching `pattern`, folder by folder."""
    has_glob = any(ch in pattern for ch in _GLOB_CHARS)
    if not has_glob:
        pattern = pattern.rstrip("/") + "/**"
    root = pattern[: min((pattern.find(ch) for ch in _GLOB_CHARS if ch in pattern), default=len(pattern))]
    root = root.rsplit("/", 1)[0] if "/" in root else root
    matcher = _glob_regex(pattern)
    # fs.walk lists one folder at a time, so a prefix with millions of keys is never held whole.
    for folder, _, names in fs.walk(root):
        for name in sorted(names):
            path = posixpath.join(folder, name)
            match = matcher.match(path)
            if match and (has_glob or posixpath.splitext(name)[1].lower() in AUDIO_SUFFIXES):
                yield path, match.groupdict().get("language")


def list_recordings(uri: str, defaults: Defaults, storage_options: dict | None = None,
                    chunk_rows: int = 100_000) -> Manifest:
    """Build the manifest by listing `uri` (a prefix or glob; `{language}` takes it from the path)."""
    fs, pattern = filesystem(uri.replace("{language}", "__LANGUAGE__"), storage_options)
    pattern = pattern.replace("__LANGUAGE__", "{language}")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    tables: list[pa.Table] = []
    audio: list[str] = []
    language: list[str | None] = []

    def flush() -> None:
        if audio:
            chunk = pa.table({"audio": pa.array(audio, pa.string()), "language": pa.array(language, pa.string())})
            lines = list(range(len(tables) * chunk_rows + 1, len(tables) * chunk_rows + len(audio) + 1))
            tables.append(_normalise(chunk, lines, uri, "listing", "", protocol, defaults))
            audio.clear()
            language.clear()

    try:
        for path, path_language in _iter_listing(fs, pattern):
            audio.append(uri_of(fs, path))
            language.append(path_language)
            if len(audio) >= chunk_rows:
                flush()
    except FileNotFoundError:
        raise ManifestError(f"{uri}: no such prefix") from None
    flush()
    if not tables:
        raise ManifestError(f"{uri}: no recordings match")
    combined = pa.concat_tables(tables)
    return Manifest(table=combined, rows_in=combined.num_rows, duplicates=0, files=[uri], passthrough=[])
