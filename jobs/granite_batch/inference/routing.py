"""Which model serves each row, and the rows' requests as each model is asked them.

A job names one model or several, in order (`models:`); each row goes to the first whose profile
serves its request (task, language, target language, keywords, speakers, word times, an explicit
punctuation); a row none serves gets an error naming what each model lacks. Beside the manifest's
request columns, a row may carry `speakers`, `punctuation` and `word_timestamps` (true/false) to
override the job's setting; they are carried through to the output like other extra columns.
`punctuation` left unset means "punctuated where the serving model can" (granite-speech-4.1-2b).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc

from granite_batch.models.profiles import ModelProfile, route
from granite_batch.models.prompts import Request
from granite_batch.schema import FLAG_COLUMNS

ROUTE_COLUMN = "model_index"  # internal: the position, in the job's model list, of the row's model
_TRUE = {"true", "yes", "1", "on"}
_FALSE = {"false", "no", "0", "off"}


@dataclass(frozen=True)
class RequestFlags:
    """The job's settings for rows that leave a flag unset."""

    speakers: bool = False
    punctuation: bool | None = None  # None: punctuated wherever the serving model can
    word_timestamps: bool = False


def _flag(value, name: str) -> tuple[bool | None, str | None]:
    """(value, None), or (None, error) for a value that is no boolean."""
    if value is None or isinstance(value, bool):
        return value, None
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE, None
    if text == "":
        return None, None
    return None, f"invalid {name}: {str(value)[:40]!r} (use true or false)"


def row_requests(table: pa.Table, flags: RequestFlags) -> tuple[list[Request], list[bool | None], list[str | None]]:
    """Each row's request (punctuation True only where asked for explicitly), its explicit punctuation
    (None: the job's, or unset), and an error for a flag that is not a boolean."""
    columns = {
        name: table.column(name).to_pylist() if name in table.column_names else [None] * table.num_rows
        for name in ("task", "target_language", "keywords", "language") + FLAG_COLUMNS
    }
    requests, punctuation, errors = [], [], []
    for row in range(table.num_rows):
        values, error = {}, None
        for name in FLAG_COLUMNS:
            value, problem = _flag(columns[name][row], name)
            error = error or problem
            values[name] = getattr(flags, name) if value is None else value
        requests.append(
            Request(
                columns["task"][row],
                columns["target_language"][row],
                tuple(columns["keywords"][row] or ()),
                columns["language"][row],
                punctuation=values["punctuation"] is True,
                speakers=bool(values["speakers"]),
                word_times=bool(values["word_timestamps"]),
            )
        )
        punctuation.append(values["punctuation"])
        errors.append(error)
    return requests, punctuation, errors


def served_request(request: Request, punctuation: bool | None, profile: ModelProfile | None) -> Request:
    """`request` as the serving model is asked it: punctuated when asked for, or when unset and the
    model can (4.1-2b's default); speakers and word times only from a model that makes them."""
    if profile is None:
        return request
    wanted = profile.punctuation if punctuation is None else punctuation
    return replace(
        request,
        punctuation=wanted and profile.punctuation,
        speakers=request.speakers and profile.speakers,
        word_times=request.word_times and profile.word_times,
    )


def session_rows(table: pa.Table, flags: RequestFlags, profile: ModelProfile) -> list[bool]:
    """Which rows of a recording table `profile`'s model decodes in speaker sessions
    (audio/sessions.py): those it serves speaker labels."""
    if not profile.speakers:
        return [False] * table.num_rows
    requests, punctuation, _ = row_requests(table, flags)
    return [served_request(r, p, profile).speakers for r, p in zip(requests, punctuation)]


def route_table(
    table: pa.Table, models: list[tuple[str, ModelProfile]], flags: RequestFlags, keep: int | None = None
) -> pa.Table:
    """Add ROUTE_COLUMN (the first of `models` that serves each row); a row none serves keeps index 0
    and gets `error` naming what each model lacks. Rows that already have an error are left alone.
    With `keep`, only the rows routed to that model are returned."""
    requests, _, flag_errors = row_requests(table, flags)
    errors = table.column("error").to_pylist()
    indices = []
    for row, request in enumerate(requests):
        index = 0
        if errors[row] is None:
            errors[row] = flag_errors[row]
        if errors[row] is None:
            chosen, why = route(request, models)
            index, errors[row] = (chosen, None) if chosen is not None else (0, why)
        indices.append(index)
    table = table.set_column(table.schema.get_field_index("error"), "error", pa.array(errors, pa.string()))
    table = table.append_column(ROUTE_COLUMN, pa.array(indices, pa.int32()))
    return table if keep is None else table.filter(pc.equal(table.column(ROUTE_COLUMN), keep))
