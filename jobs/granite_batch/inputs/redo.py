"""Which committed rows a run does again: selections over the committed rows' columns.

A selection is one or more terms joined by ` and `; a term is `column op value`, with `op` one of
`== != < <= > >=`, or `column is null` / `column is not null`. The value is cast to the column's type
(quotes are optional: `model == 'ibm-granite/granite-4.0-1b-speech'`). A dotted column reaches into
the segments (`segments.avg_logprob < -1.0`, `segments.words.confidence < 0.3`): such a term holds for
a row when it holds for any of its segments (or words). `language` is the row's partition.

A row is redone when any selection holds for it; it is counted under the first one that does. A term
over a column a committed file does not have (quality fields that older runs did not write) holds for
none of that file's rows. `run_id` starts with the run's UTC start time (`20261001T120000Z-...`), so
`run_id < 20261001` selects the rows written before October 2026.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

_TERM = re.compile(
    r"\s*(?P<column>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)\s*"
    r"(?:(?P<null>is\s+(?:not\s+)?null)|(?P<op>==|!=|<=|>=|<|>|=)\s*(?P<value>.+?))\s*",
    re.IGNORECASE,
)
_COMPARE = {"==": pc.equal, "=": pc.equal, "!=": pc.not_equal, "<": pc.less, "<=": pc.less_equal}
_COMPARE |= {">": pc.greater, ">=": pc.greater_equal}


class SelectionError(ValueError):
    """A selection that cannot be parsed; the message names the term."""


@dataclass(frozen=True)
class Term:
    column: str  # dotted: into the segments' structs
    op: str  # one of _COMPARE, or "is null" / "is not null"
    value: str | None

    def holds(self, table: pa.Table) -> np.ndarray:
        """A boolean per row of `table`: whether this term holds (false where the column is absent)."""
        name, *fields = self.column.split(".")
        if name not in table.column_names:
            return np.zeros(table.num_rows, bool)
        values = table.column(name).combine_chunks()
        parents: np.ndarray | None = None  # the row of each flattened value
        for field in fields:
            while pa.types.is_list(values.type) or pa.types.is_large_list(values.type):
                inner = np.asarray(pc.list_parent_indices(values))
                parents = inner if parents is None else parents[inner]
                values = pc.list_flatten(values)
            if not pa.types.is_struct(values.type) or values.type.get_field_index(field) < 0:
                raise SelectionError(f"{self}: {self.column!r} names no field {field!r}")
            values = pc.struct_field(values, field)
        if self.op == "is null":
            matched = pc.is_null(values)
        elif self.op == "is not null":
            matched = pc.is_valid(values)
        else:
            try:
                value = pa.scalar(self.value).cast(values.type)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
                raise SelectionError(f"{self}: {self.value!r} is not a {values.type}") from None
            matched = _COMPARE[self.op](values, value)
        hits = np.asarray(matched.fill_null(False), dtype=bool)
        if parents is None:
            return hits
        rows = np.zeros(table.num_rows, bool)
        rows[parents[hits]] = True
        return rows

    def __str__(self) -> str:
        return f"{self.column} {self.op}" + ("" if self.value is None else f" {self.value}")


@dataclass(frozen=True)
class Selection:
    text: str  # as the user wrote it: the summary counts rows under this name
    terms: tuple[Term, ...]

    @property
    def columns(self) -> set[str]:
        return {term.column.split(".")[0] for term in self.terms}

    def holds(self, table: pa.Table) -> np.ndarray:
        hits = np.ones(table.num_rows, bool)
        for term in self.terms:
            hits &= term.holds(table)
        return hits


def parse_selection(text: str) -> Selection:
    """One selection: terms joined by ` and ` (see the module's docstring). Raises SelectionError."""
    terms = []
    for part in re.split(r"\s+and\s+", text.strip(), flags=re.IGNORECASE):
        match = _TERM.fullmatch(part)
        if match is None:
            raise SelectionError(
                f"cannot read {part!r} in redo selection {text!r}: write `column op value` "
                "(op: == != < <= > >=) or `column is [not] null`"
            )
        if match["null"]:
            op, value = " ".join(match["null"].lower().split()), None
        else:
            op, value = match["op"], match["value"].strip()
            if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
                value = value[1:-1]
        terms.append(Term(match["column"], op, value))
    return Selection(text.strip(), tuple(terms))


def parse_selections(texts: list[str]) -> list[Selection]:
    return [parse_selection(text) for text in texts]


def selected(selections: list[Selection], table: pa.Table) -> pa.Array:
    """Per row of `table`, the index of the first selection that holds for it (null: none does)."""
    chosen = np.full(table.num_rows, -1, np.int16)
    for index, selection in reversed(list(enumerate(selections))):
        chosen[selection.holds(table)] = index
    return pa.array(chosen, pa.int16(), mask=chosen < 0)


def columns_needed(selections: list[Selection]) -> set[str]:
    """The committed columns the selections read (`language` comes from the file's partition)."""
    return set().union(*(s.columns for s in selections)) - {"language"} if selections else set()
