"""A manifest's rows as the job sees them: the normalised columns, their defaults, the
default id, and the checks shared by every reader.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

KNOWN_COLUMNS = ("id", "audio", "language", "task", "target_language", "keywords", "channels")


TEXT_COLUMNS = ("id", "audio", "language", "task", "target_language", "channels")


# Output columns a manifest may not carry: they would be silently overwritten.
RESERVED_COLUMNS = (
    "text",
    "segments",
    "language_detected",
    "duration_s",
    "error",
    "model",
    "model_revision",
    "run_id",
)


CHANNEL_MODES = ("mix", "split")


EMBEDDED_PREFIX = "embedded:"  # the source name of embedded audio that came without a path


NORMALISED_FIELDS = [
    pa.field("id", pa.string()),
    pa.field("audio", pa.string()),
    pa.field("language", pa.string()),
    pa.field("task", pa.string()),
    pa.field("target_language", pa.string()),
    pa.field("keywords", pa.list_(pa.string())),
    pa.field("error", pa.string()),
    # Inputs of the row's work, not output columns: the recording's bytes when the manifest (or a tar
    # shard) carries them, and how its channels are transcribed.
    pa.field("audio_bytes", pa.large_binary()),
    pa.field("channels", pa.string()),
]


INPUT_ONLY_COLUMNS = ("audio_bytes", "channels")


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
    channels: str = "mix"  # mix: downmix to mono; split: each channel transcribed on its own
    reference_column: str | None = None  # the column read as `reference` (e.g. HF test sets' `text`)

    @classmethod
    def from_config(cls, config) -> Defaults:
        """The defaults a job config (`config.JobConfig`) gives rows."""
        return cls(
            config.language,
            config.task,
            config.target_language,
            tuple(config.keywords),
            tuple(config.allowed_prefixes),
            config.channels,
            config.reference_column,
        )


@dataclass
class Manifest:
    """The validated units of work: one row per distinct id."""

    table: pa.Table
    rows_in: int
    duplicates: int
    files: list[str]
    passthrough: list[str] = field(default_factory=list)
    ids_replaced: int = 0  # rows whose `id` was empty, blank or null and got the digest id
    duplicates_differing: int = 0  # duplicates (of `duplicates`) whose recording differs from the kept row's


def default_id(
    audio: str, task: str, target_language: str | None, keywords: list[str], content: str | None = None
) -> str:
    """A digest of what the row asks for, identical in every run. `content`: for a recording the
    row carries (embedded bytes, a shard member), a digest of its bytes, so two recordings that
    share a path (`audio.path`, a member name) but differ get different ids.

    Ids a manifest gives are its own, with surrounding whitespace stripped (`" x"` is `"x"`); an
    empty or blank id gets this default."""
    fields = [audio, task, target_language, list(keywords)] + ([content] if content is not None else [])
    key = json.dumps(fields, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


def content_digest(data: bytes) -> str:
    """The digest of a recording's bytes that default ids and duplicate checks use."""
    return hashlib.sha256(data).hexdigest()[:32]


def differing_duplicates(table: pa.Table, unique: pa.Table) -> int:
    """How many rows of `table` repeat an id of `unique` (its first rows) but name another
    recording (another `audio`, or other embedded bytes): not the same recording, so dropping
    them is worth a warning, not only a count."""
    if table.num_rows == unique.num_rows or "audio" not in table.column_names:
        return 0
    columns = [c for c in ("audio", "audio_bytes") if c in table.column_names]
    counts = pc.value_counts(table.column("id"))
    repeated = counts.field("values").filter(pc.greater(counts.field("counts"), 1))
    if len(repeated) == 0:
        return 0

    def recordings(t: pa.Table) -> list[tuple]:
        """(id, what names the recording) of `t`'s rows whose id repeats."""
        t = t.filter(pc.is_in(t.column("id"), value_set=repeated)).select(["id", *columns])
        return [
            (row["id"], *(content_digest(v) if isinstance(v, bytes) else v for v in (row[c] for c in columns)))
            for row in t.to_pylist()
        ]

    firsts = {key[0]: key for key in recordings(unique)}
    differing = sum(key != firsts[key[0]] for key in recordings(table))
    return differing


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
    arrays = [
        _cast(table.column(f.name), f.type) if f.name in table.column_names else pa.nulls(n, f.type) for f in schema
    ]
    return pa.Table.from_arrays(arrays, schema=schema)


def first_of_each_id(table: pa.Table) -> pa.Table:
    """The first row of each distinct `id`, in table order."""
    ids = table.column("id")
    unique = pc.unique(ids)
    if len(unique) == table.num_rows:
        return table
    return table.take(pc.index_in(unique, value_set=ids))  # index_in answers each id's first position
