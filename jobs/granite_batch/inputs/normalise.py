"""One block of manifest rows normalised: request columns checked and defaulted,
audio resolved (URIs, embedded bytes, shard members), passthrough columns kept.
"""

from __future__ import annotations

import hashlib
import logging
import posixpath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from granite_batch.inputs.formats import _SlowPath
from granite_batch.inputs.rows import (
    CHANNEL_MODES,
    EMBEDDED_PREFIX,
    KNOWN_COLUMNS,
    RESERVED_COLUMNS,
    Defaults,
    ManifestError,
    content_digest,
    default_id,
    normalised_schema,
)
from granite_batch.models.prompts import (
    ASR_LANGUAGES,
    AUTO_LANGUAGE,
    UNDETERMINED_LANGUAGE,
    check_request,
    unlisted_request,
)
from granite_batch.storage import LOCAL_PROTOCOLS, is_allowed

log = logging.getLogger(__name__)


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
    if pa.types.is_integer(kind):
        return "int"
    if pa.types.is_floating(kind):
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
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset : array.offset + len(array) + 1]
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
    if pa.types.is_dictionary(array.type):  # Parquet writers dictionary-encode repetitive columns (pandas' category)
        array = array.dictionary_decode()
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
        return (
            pa.array([list(default)] * n, pa.list_(pa.string()))
            if default
            else pa.ListArray.from_arrays(pa.array(np.zeros(n + 1, np.int32)), pa.array([], pa.string()))
        )
    array = table.column("keywords").combine_chunks()
    kind = array.type
    if pa.types.is_null(kind):
        return _keywords_column(table.drop_columns(["keywords"]), n, where, default)
    if pa.types.is_string(kind) or pa.types.is_large_string(kind):
        lists = pc.split_pattern(array.cast(pa.string()), ",")
    elif (pa.types.is_list(kind) or pa.types.is_large_list(kind)) and (
        pa.types.is_string(kind.value_type)
        or pa.types.is_large_string(kind.value_type)
        or pa.types.is_null(kind.value_type)
    ):
        lists = array
    else:
        return where.fail(
            _first_valid(array),
            f"field 'keywords' must be a list of strings or one comma-separated string, not {_type_name(kind)}",
        )
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
    digests = [EMBEDDED_PREFIX + hashlib.sha256(value.as_buffer()).hexdigest()[:32] for value in data.take(rows)]
    return pc.replace_with_mask(names, missing, pa.array(digests, pa.string()))


def _channels_column(table: pa.Table, n: int, where: _Where, default: str) -> tuple[pa.Array, pa.Array]:
    """(channels, error): `mix` or `split` per row (the job's default where empty); another value is
    that row's error."""
    array = _text_column(table, "channels", where)
    if array is None or array.null_count == n:
        return pa.array([default] * n, pa.string()), pa.nulls(n, pa.string())
    array = pc.fill_null(pc.utf8_lower(array), default)
    bad = pc.invert(pc.is_in(array, value_set=pa.array(CHANNEL_MODES)))
    errors = pc.if_else(
        bad,
        pc.binary_join_element_wise(pa.scalar("unsupported channels '"), array, pa.scalar("'; use mix or split"), ""),
        pa.scalar(None, pa.string()),
    )
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
            fixed = [posixpath.normpath(posixpath.join(base, path)) for path in pc.take(audio, indices).to_pylist()]
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


def _normalise(table: pa.Table, where: _Where, base: str, protocol: str, defaults: Defaults) -> tuple[pa.Table, int]:
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
    keyworded_translations = pc.sum(
        pc.and_(pc.and_(pc.equal(task, "ast"), pc.is_null(error)), pc.greater(pc.list_value_length(keywords), 0))
    ).as_py()
    if keyworded_translations:
        log.warning(
            "%s: %d row(s): %s", where.name, keyworded_translations, unlisted_request("en", "ast", "fr", ("keyword",))
        )

    channels, channels_error = _channels_column(table, n, where, defaults.channels)
    error = pc.coalesce(error, channels_error)

    if defaults.allowed_prefixes:  # embedded audio is read from nowhere: no prefix applies to it
        refused = [
            None
            if e is not None or inside or is_allowed(a, defaults.allowed_prefixes)
            else f"not allowed: {a} is outside the allowed prefixes"
            for a, e, inside in zip(audio.to_pylist(), error.to_pylist(), embedded.to_pylist())
        ]
        error = pc.coalesce(error, pa.array(refused, pa.string()))

    ids = _text_column(table, "id", where)
    replaced = 0 if ids is None else ids.null_count
    if ids is None:
        ids = pa.nulls(n, pa.string())
    if ids.null_count:
        missing = pc.is_null(ids)
        rows = pc.indices_nonzero(missing)
        contents = [None if b is None else content_digest(b) for b in data.take(rows).to_pylist()]
        digests = [
            default_id(a, t, g, k, c)
            for a, t, g, k, c in zip(
                audio.take(rows).to_pylist(),
                task.take(rows).to_pylist(),
                target.take(rows).to_pylist(),
                keywords.take(rows).to_pylist(),
                contents,
            )
        ]
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
    """Refuse (never rename) a column the output would shadow: an output column (`text`,
    `language_detected`, ... every transcript column the job writes), a case or whitespace variant
    of any column the job knows (`Text`, `ID `: one name in case-insensitive readers), and a column
    with an empty or blank name. The error names the column; the user renames it."""
    for column in table.column_names:
        if not column.strip():
            raise ManifestError(f"{name}: a column has an empty name {column!r}; name it or drop it")
    reserved = [column for column in RESERVED_COLUMNS if column in table.column_names]
    if reserved:
        hint = " (reference texts: --reference-column text)" if reserved[0] == "text" else ""
        raise ManifestError(f"{name}: column {reserved[0]!r} is reserved for the output; rename it{hint}")
    known = {c.casefold(): c for c in (*RESERVED_COLUMNS, *KNOWN_COLUMNS, "reference")}
    for column in table.column_names:
        twin = known.get(column.strip().casefold())
        if twin is not None and twin != column:
            raise ManifestError(
                f"{name}: column {column!r} differs from the job's column {twin!r} only in case or spaces; rename it"
            )


def normalise_rows(table: pa.Table, defaults: Defaults) -> pa.Table:
    """Rows of a user's Ray Dataset (granite_batch.build_processor) in the normalised manifest schema:
    the same rules as a manifest's rows, with a `path` column standing for `audio` when there is no
    `audio` (as Ray's `read_binary_files(include_paths=True)` names it); relative paths stay as given.
    Raises ManifestError naming the block's row for a row no manifest would accept."""
    if "audio" not in table.column_names:
        if "bytes" in table.column_names:  # read_binary_files: the recording itself, named by its path
            names = table.column("path") if "path" in table.column_names else pa.nulls(table.num_rows, pa.string())
            audio = pa.StructArray.from_arrays(
                [table.column("bytes").combine_chunks(), pa.array(names.to_pylist(), pa.string())], ["bytes", "path"]
            )
            table = table.drop_columns([c for c in ("bytes", "path") if c in table.column_names])
            table = table.append_column("audio", audio)
        elif "path" in table.column_names:
            table = table.rename_columns(["audio" if name == "path" else name for name in table.column_names])
    out, _ = _normalise(table, _Where("dataset block", "row", list(range(table.num_rows))), "", "file", defaults)
    return out
