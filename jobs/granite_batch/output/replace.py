"""New rows in place of old ones: how a redo run (inputs/redo.py) keeps one row per id at every moment.

Plain Parquet files cannot change together, but one file can be replaced whole (a rename on POSIX
filesystems, a PUT over the key on object stores: a reader sees the old file or the new one). So
when the writer commits a file holding new rows for ids whose old rows sit in committed files, each
of those old files is rewritten with the new rows in place of the old ones, one file at a time, and
only the file's other rows (new ids) are committed as a new file. An id is in one file before and
after each step, so a reader never sees it twice or not at all, and a crash between steps leaves
every id with one row: the ones replaced already carry their new row, the rest still their old one.

One exception: a new row whose partition differs from its old row's (`language: auto` identified
another language) cannot share the old file. Its old row is removed with that file's rewrite and the
new row is committed with the new file right after, so for that moment the id has no row; a crash
in between leaves it without one, and the next run (which plans every manifest id with no row)
does it again.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from granite_batch.storage import uri_of

log = logging.getLogger(__name__)


class Replacements:
    """The committed rows a run does again: each id and the file that holds its old row."""

    def __init__(self) -> None:
        self.files: list[str] = []
        self._ids: list[pa.Array] = []
        self._where: list[np.ndarray] = []
        self._index: tuple[pa.Array, np.ndarray] | None = None
        self.rows_replaced = 0  # new rows written in place of old ones
        self.rows_moved = 0  # new rows committed in another partition than their old ones

    def add(self, path: str, ids: pa.Array | pa.ChunkedArray) -> None:
        if isinstance(ids, pa.ChunkedArray):
            ids = ids.combine_chunks()
        if path not in self.files:
            self.files.append(path)
        self._ids.append(ids.cast(pa.string()))
        self._where.append(np.full(len(ids), self.files.index(path), np.int32))
        self._index = None

    def __len__(self) -> int:
        return sum(len(ids) for ids in self._ids)

    def lookup(self, ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """The index in `files` of each id's old file; -1 for an id with no old row to replace."""
        if self._index is None:
            merged = pa.concat_arrays(self._ids) if self._ids else pa.array([], pa.string())
            self._index = (merged, np.concatenate(self._where) if self._where else np.zeros(0, np.int32))
        merged, where = self._index
        found = pc.index_in(ids, value_set=merged)
        positions = found.fill_null(-1).to_numpy(zero_copy_only=False)
        return np.where(positions >= 0, where[np.maximum(positions, 0)], -1)

    def commit(
        self, fs, staged: str, language: str, scratch: str, before_commit: Callable[[], None] | None = None
    ) -> int:
        """Put the rows of the `staged` file (partition `language`) that replace old rows into their old
        files, each rewritten whole in one step (under `scratch` first), and leave the staged file
        holding only the other rows. Returns how many rows it still holds (0: nothing left to commit)."""
        with fs.open(staged, "rb") as handle:
            ids = pq.read_table(handle, columns=["id"]).column("id")
        where = self.lookup(ids)
        if not (where >= 0).any():
            return len(where)
        with fs.open(staged, "rb") as handle:
            new = pq.read_table(handle)
        placed = np.zeros(new.num_rows, bool)
        for index in np.unique(where[where >= 0]).tolist():
            path = self.files[index]
            if not fs.exists(path):  # gone since planning (--retry-failed dropped its rows): new rows only
                continue
            incoming = new.filter(pa.array(where == index))
            same_partition = posixpath.basename(posixpath.dirname(path)) == f"language={language}"
            with fs.open(path, "rb") as handle:
                old = pq.read_table(handle)
            kept = old.filter(pc.invert(pc.is_in(old.column("id"), value_set=incoming.column("id"))))
            parts = [kept]
            if same_partition:
                try:
                    parts = [pa.concat_tables([kept, incoming], promote_options="permissive")]
                    placed |= where == index
                except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:  # cannot share a file: moved instead
                    log.warning("%s: new rows do not fit its schema (%s); they go to a new file", path, exc)
            self._replace(fs, path, parts[0], scratch, before_commit)
            replaced = incoming.num_rows if same_partition and placed[where == index].all() else 0
            self.rows_replaced += replaced
            self.rows_moved += incoming.num_rows - replaced
        rest = new.filter(pa.array(~placed))
        if rest.num_rows:
            with fs.open(staged, "wb") as handle:
                pq.write_table(rest, handle, compression="zstd")
        else:
            fs.rm(staged)
        return rest.num_rows

    @staticmethod
    def _replace(fs, path: str, table: pa.Table, scratch: str, before_commit: Callable[[], None] | None) -> None:
        if table.num_rows == 0:
            if before_commit is not None:
                before_commit()
            fs.rm(path)
            return
        rewritten = posixpath.join(scratch, posixpath.basename(path))
        fs.makedirs(scratch, exist_ok=True)
        with fs.open(rewritten, "wb") as handle:
            pq.write_table(table, handle, compression="zstd")
        if before_commit is not None:
            before_commit()  # the old file stays as it was if this raises
        fs.mv(rewritten, path)
        log.info("replaced %s (%d rows)", uri_of(fs, path), table.num_rows)
