"""Every table that travels between stages and into the output, declared once: the transcript
schema, its segment and word types, the segment rows' columns, and the output root's folders.
"""

from __future__ import annotations

import logging
import posixpath

import pyarrow as pa

log = logging.getLogger(__name__)

# One word of a segment (alignment.py): seconds from the recording's start, its text, and the mean
# CTC posterior probability of its aligned letters (null where none was aligned).
WORD_TYPE = pa.struct(
    [("start", pa.float64()), ("end", pa.float64()), ("text", pa.string()), ("confidence", pa.float64())]
)


# What a segment's own decoding says of its quality (models/quality.py; docs/reference/output.md):
# flags need no reference. `low_confidence` is null where no confidence was computed, `speech_ratio`
# where no CTC frames were (LLM engines without word times), `language_mismatch` where language detection is off;
# `escalated_from` names the model whose segment this one replaced (a cascade), `escalated_for` why.
QUALITY_TYPE = pa.struct(
    [
        ("low_confidence", pa.bool_()),
        ("repetition", pa.bool_()),
        ("chars_per_s", pa.float64()),
        ("rate", pa.bool_()),
        ("speech_ratio", pa.float64()),
        ("language_mismatch", pa.bool_()),
        ("escalated_from", pa.string()),
        ("escalated_for", pa.list_(pa.string())),
    ]
)


# One speech segment of a recording (docs/contract.md, `segments`): seconds from the recording's
# start; `truncated` when decoding stopped at the token budget; `avg_logprob` the mean scaled log-probability
# of its tokens (null where no language model scored them); `words` with word timestamps on; `speaker` and
# `channel` stay null until something computes them (speaker labels, split channels); `model` made it.
SEGMENT_TYPE = pa.struct(
    [
        ("start", pa.float64()),
        ("end", pa.float64()),
        ("text", pa.string()),
        ("truncated", pa.bool_()),
        ("avg_logprob", pa.float64()),
        ("speaker", pa.string()),
        ("words", pa.list_(WORD_TYPE)),
        ("channel", pa.int32()),
        ("model", pa.string()),
        ("quality", QUALITY_TYPE),
    ]
)


# The contract's columns, in order; passthrough columns follow them.
TRANSCRIPT_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("audio", pa.string(), nullable=False),
    pa.field("language", pa.string(), nullable=False),
    pa.field("task", pa.string(), nullable=False),
    pa.field("target_language", pa.string()),
    pa.field("text", pa.string()),
    pa.field("segments", pa.list_(SEGMENT_TYPE)),
    pa.field("language_detected", pa.string()),
    pa.field("duration_s", pa.float64()),
    pa.field("error", pa.string()),
    pa.field("model", pa.string(), nullable=False),
    pa.field("model_revision", pa.string()),
    pa.field("run_id", pa.string(), nullable=False),
]


# Per-row flags a manifest row may carry (true/false) to override the job's setting (inference/routing.py);
# carried through to the output like other extra columns.
FLAG_COLUMNS = ("speakers", "punctuation", "word_timestamps")


TRANSCRIPTS_DIR = "transcripts"


RUNS_DIR = "runs"


STAGING_DIR = "_staging"


SECOND_PASS_DIR = "second_pass"


EVAL_DIR = "eval"


# A second pass's dataset: OUTPUT/second_pass/<name>/, partitioned by language like the transcripts.
SECOND_PASS_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("language", pa.string(), nullable=False),
    pa.field("name", pa.string(), nullable=False),
    pa.field("output", pa.string()),
    pa.field("model", pa.string(), nullable=False),
    pa.field("model_revision", pa.string()),
    pa.field("run_id", pa.string(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("chunked", pa.bool_(), nullable=False),
]


SECOND_PASS_SCHEMA = pa.schema(SECOND_PASS_FIELDS)


def second_pass_dir(name: str) -> str:
    """The folder of second pass `name`, relative to the output root."""
    return posixpath.join(SECOND_PASS_DIR, name)


def transcript_schema(passthrough: pa.Schema | None = None) -> pa.Schema:
    """The schema of transcript rows: the contract's columns, then the manifest's extra columns.

    `keywords` is an input of the request (and part of the default id), not a passthrough column;
    nor are the row's embedded audio bytes and its `channels` mode.
    """
    fields = list(TRANSCRIPT_FIELDS)
    names = {f.name for f in fields} | {"keywords", "audio_bytes", "channels"}
    for extra in passthrough or []:
        if extra.name not in names:
            fields.append(extra)
    return pa.schema(fields)


def file_schema(schema: pa.Schema) -> pa.Schema:
    """What goes inside each Parquet file: everything but the partition column."""
    return schema.remove(schema.get_field_index("language"))


def conform(table: pa.Table, schema: pa.Schema) -> pa.Table:
    """Select and cast `table`'s columns into `schema`'s order and types; a nullable column the
    table lacks (e.g. `language_detected` when detection is off) is all nulls."""
    names = set(table.column_names)
    return pa.Table.from_arrays(
        [
            table.column(f.name).cast(f.type) if f.name in names or not f.nullable else pa.nulls(table.num_rows, f.type)
            for f in schema
        ],
        schema=schema,
    )


def error_reason(error: str) -> str:
    """The reason class of an error string ("decode failed: ..." -> "decode failed")."""
    return error.split(":", 1)[0].strip()


# Segment rows: what the decode and segment stages hand the model, one row per speech segment, and
# what the driver's RecordingAssembler (inference/assemble.py) joins back into one row per recording.
# Each carries its recording's columns, then SEGMENT_FIELDS, then `samples` (large_list<float32>, the
# segment's own; null on an end row). `row_kind` says what the row is:
# - SEGMENT: one speech segment of its recording, with `segment_index` (0-based, in time order),
#   `start_s` / `end_s` (seconds from the recording's start) and `channel` (null for mono). Its
#   `segment_count` is the recording's, or null when the recording was cut as it was decoded (a long
#   recording, audio/decode_cut.py): more rows are to come and its END row brings the count (and the
#   recording's `duration_s`, which such a segment row lacks).
# - END: no segment: the recording's last row. `segment_count` is how many SEGMENT rows it has: 0 for
#   a recording without any (failed, silent, too short to hold speech), which has no other row; the
#   number sent before it for a long recording cut as it was decoded. It carries the recording's
#   `duration_s` and `error` (an error after some segments left: the recording is written as an error
#   row once they have arrived).
# - WHOLE: a decoded recording still to be cut, all its samples (the decode stage's rows that the
#   segment stage, audio/segment.py `segment_blocks`, cuts into SEGMENT and END rows); never reaches
#   the model.
# A recording is complete once a row with its `segment_count` has arrived and that many segments.
# A SEGMENT row may be a speaker session (audio/sessions.py): several consecutive calls of one
# recording decoded in order, each with the text before it (4.1-2b-plus's incremental speaker
# attribution). Its `samples` are the calls' samples end to end and `calls` lists them (CALL_TYPE:
# each call's sample count and its span in the recording); `calls` is null on every other row.
SEGMENT = "segment"
END = "end"
WHOLE = "whole"
CALL_TYPE = pa.struct([("samples", pa.int64()), ("start_s", pa.float64()), ("end_s", pa.float64())])
SEGMENT_FIELDS = [
    pa.field("row_kind", pa.string(), nullable=False),
    pa.field("segment_index", pa.int32()),
    pa.field("segment_count", pa.int32()),
    pa.field("start_s", pa.float64()),
    pa.field("end_s", pa.float64()),
    pa.field("channel", pa.int32()),
    pa.field("calls", pa.list_(CALL_TYPE)),
]
# Columns a segment row has beyond its recording's (and its `samples`).
SEGMENT_COLUMNS = tuple(f.name for f in SEGMENT_FIELDS)


def segment_rows(recordings: pa.Table, samples: pa.Array | pa.ChunkedArray, row_kind, **columns) -> pa.Table:
    """Segment rows: `recordings` (one row per segment row: its recording's columns, `error`
    included), then SEGMENT_FIELDS, then `samples`. `row_kind` and each of `columns` (the other
    SEGMENT_FIELDS by name; one left out is all nulls) is a value for every row or a list of one
    per row."""
    unknown = set(columns) - set(SEGMENT_COLUMNS)
    if unknown:
        raise TypeError(f"not segment columns: {sorted(unknown)}")
    n = recordings.num_rows
    columns["row_kind"] = row_kind
    out = recordings
    for f in SEGMENT_FIELDS:
        values = columns.get(f.name)
        out = out.append_column(f, pa.array(values if isinstance(values, list) else [values] * n, f.type))
    return out.append_column("samples", samples)


# Columns the inference stage adds to each segment row; the driver folds them into the recording's row
# (`segment_text`, `segment_truncated`) and into the run summary's inference figures. `segment_model`
# is the model that made the segment; `escalate_to` (internal) the index, in the job's model list, of
# the model a cascade sends it on to (inference/escalation.py), null when it stays.
RESULT_COLUMNS = (
    "segment_text",
    "segment_truncated",
    "decoded_by",
    "new_tokens",
    "lm_positions",
    "lm_padded_positions",
    "first_of_call",
    "keywords_dropped",
    "segment_avg_logprob",
    "segment_words",
    "segment_parts",
    "segment_quality",
    "segment_model",
    "escalate_to",
)


# A tagged call (4.1-2b-plus speakers / word times) read into several output segments (tags.py).
PART_TYPE = pa.struct(
    [
        ("start", pa.float64()),
        ("end", pa.float64()),
        ("text", pa.string()),
        ("speaker", pa.string()),
        ("words", SEGMENT_TYPE.field("words").type),
    ]
)
