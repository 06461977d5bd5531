"""Delta Lake output (`output_format: delta`): the transcripts as a Delta table at OUTPUT/transcripts,
the same schema, partitioned by language, written with delta-rs (the `deltalake` package).

Every commit is a MERGE on `id` (update the row of an id the table holds, insert the others), so an id
has one row whatever runs commit, in any order, also at the same time: delta-rs commits with
optimistic concurrency (a log entry `_delta_log/<version>.json` created only if absent; on S3 a PUT
with `If-None-Match`, which delta-rs 1.x relies on instead of a DynamoDB lock:
https://github.com/delta-io/delta-rs/discussions/4482), and a merge whose files another commit
changed meanwhile fails with CommitFailedError and is run again against the new version. Readers see
one version of the table at a time: a row's replacement (a redo) and a compaction are each one commit.
Runs on a Delta output therefore take no lease of ours.
"""

from __future__ import annotations

import logging
import posixpath
import time
from collections.abc import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from granite_batch.schema import STAGING_DIR, TRANSCRIPTS_DIR, conform
from granite_batch.storage import OutputRoot

log = logging.getLogger(__name__)

DELTA_LOG = "_delta_log"
MERGE_ATTEMPTS = 20  # a merge that loses a race is run again against the newer version
BUFFER_BYTES = 256 << 20  # rows held before a merge, whatever rows_per_file says


def delta_options(output: OutputRoot) -> dict[str, str] | None:
    """delta-rs's storage options from the job's fsspec ones: the S3 endpoint (and plain HTTP for a
    local server). Credentials come from the environment, as for every other part of the job."""
    if not output.uri.startswith(("s3://", "s3a://")):
        return None
    s3 = (output.storage_options or {}).get("s3", {})
    endpoint = s3.get("endpoint_url") or (s3.get("client_kwargs") or {}).get("endpoint_url")
    options: dict[str, str] = {}
    if endpoint:
        options["AWS_ENDPOINT_URL"] = endpoint
        if endpoint.startswith("http://"):
            options["AWS_ALLOW_HTTP"] = "true"
    if s3.get("anon"):
        options["AWS_SKIP_SIGNATURE"] = "true"
    return options or None


def table_uri(output: OutputRoot, dataset_dir: str = TRANSCRIPTS_DIR) -> str:
    return posixpath.join(output.uri.rstrip("/"), dataset_dir)


def is_delta(output: OutputRoot, dataset_dir: str = TRANSCRIPTS_DIR) -> bool:
    """Whether OUTPUT/<dataset_dir> is a Delta table (it has a `_delta_log`)."""
    return output.fs.exists(output.join(dataset_dir, DELTA_LOG))


def _table(output: OutputRoot):
    from deltalake import DeltaTable

    return DeltaTable(table_uri(output), storage_options=delta_options(output))


def delta_dataset(output: OutputRoot):
    """The table's current version as a pyarrow dataset (`language` a plain column)."""
    return _table(output).to_pyarrow_dataset()


def delta_version(output: OutputRoot) -> int:
    """The version of the table's latest commit (0 for the commit that created it)."""
    return _table(output).version()


def delta_batches(
    output: OutputRoot, columns: tuple[str, ...], optional: tuple[str, ...] = ()
) -> Iterator[tuple[str, pa.Table]]:
    """(partition, table of `columns`, `language` and the `optional` columns the table has) for the
    rows of the table's current version, a batch at a time; an output with no table yields nothing."""
    if not is_delta(output):
        return
    dataset = _table(output).to_pyarrow_dataset()
    names = set(dataset.schema.names)
    wanted = list(dict.fromkeys([*columns, "language", *(c for c in optional if c in names)]))
    for batch in dataset.to_batches(columns=wanted):
        if batch.num_rows:
            table = pa.Table.from_batches([batch])
            yield f"language={table.column('language')[0]}", table


def delta_rows(output: OutputRoot) -> int:
    if not is_delta(output):
        return 0
    return _table(output).to_pyarrow_dataset().count_rows()


def _merge(output: OutputRoot, rows: pa.Table) -> tuple[dict, int]:
    """Upsert `rows` on `id` in one commit (create the table with them if there is none); delta-rs's
    metrics and the version committed."""
    from deltalake import write_deltalake
    from deltalake.exceptions import CommitFailedError, TableNotFoundError

    uri, options = table_uri(output), delta_options(output)
    for attempt in range(MERGE_ATTEMPTS):
        try:
            try:
                table = _table(output)
            except TableNotFoundError:  # the first commit creates the table; a second creator fails and merges
                write_deltalake(uri, rows, partition_by=["language"], mode="error", storage_options=options)
                return {"num_target_rows_inserted": rows.num_rows}, 0
            metrics = (
                table.merge(rows, "t.id = s.id", source_alias="s", target_alias="t", merge_schema=True)
                .when_matched_update_all()
                .when_not_matched_insert_all()
                .execute()
            )
            return metrics, table.version()
        except (CommitFailedError, FileExistsError) as exc:
            if attempt + 1 == MERGE_ATTEMPTS:
                raise
            log.info("Delta commit lost a race (%s); merging again", str(exc).splitlines()[0])
            time.sleep(min(2.0, 0.05 * 2**attempt))
        except Exception as exc:  # delta-rs raises DeltaError for "table already exists" on a race
            if "already exists" not in str(exc) or attempt + 1 == MERGE_ATTEMPTS:
                raise
    raise AssertionError("unreachable")


class DeltaWriter:
    """The TranscriptWriter of a Delta output: rows are held until `rows_per_file` rows (or
    BUFFER_BYTES, or `commit_interval_s`), then merged on `id` in one commit."""

    def __init__(
        self,
        output: OutputRoot,
        run_id: str,
        schema: pa.Schema,
        rows_per_file: int = 200_000,
        commit_interval_s: float = 600.0,
        before_commit: Callable[[], None] | None = None,
    ):
        self.output, self.run_id, self.schema = output, run_id, schema
        self.rows_per_file, self.commit_interval_s = rows_per_file, commit_interval_s
        self.before_commit = before_commit
        self.committed: list[str] = []  # `OUTPUT/transcripts@v<version>` per commit
        self.rows_replaced = 0  # ids whose row a merge updated (redo, retry, a concurrent run's)
        self._held: list[pa.Table] = []
        self._opened = time.monotonic()

    def write(self, table: pa.Table) -> None:
        if not self._held:
            self._opened = time.monotonic()
        self._held.append(conform(table, self.schema))
        rows = sum(t.num_rows for t in self._held)
        if (
            rows >= self.rows_per_file
            or sum(t.nbytes for t in self._held) >= BUFFER_BYTES
            or time.monotonic() - self._opened >= self.commit_interval_s
        ):
            self.commit_open()

    def commit_open(self) -> None:
        if not self._held:
            return
        rows = pa.concat_tables(self._held)
        self._held = []
        # The first row of each id only (a merge refuses two source rows for one target row).
        last = pc.equal(pc.index_in(rows.column("id"), value_set=rows.column("id")), pa.array(range(rows.num_rows)))
        rows = rows.filter(last)
        if self.before_commit is not None:
            self.before_commit()
        metrics, version = _merge(self.output, rows)
        self.rows_replaced += int(metrics.get("num_target_rows_updated", 0))
        self.committed.append(f"{table_uri(self.output)}@v{version}")
        log.info("committed %d rows to %s", rows.num_rows, self.committed[-1])

    def close(self) -> list[str]:
        """Commit what is held; remove the run's staging folder (its plan), as TranscriptWriter does."""
        self.commit_open()
        staging = self.output.join(STAGING_DIR, self.run_id)
        if self.output.fs.exists(staging):
            self.output.fs.rm(staging, recursive=True)
        return self.committed


def optimize(output: OutputRoot, target_mb: float = 256.0) -> dict:
    """Compact the table's small files with delta-rs's optimize (one commit; old files stay for
    readers of older versions until a `vacuum`). Returns delta-rs's metrics."""
    return _table(output).optimize.compact(target_size=int(target_mb * (1 << 20)))
