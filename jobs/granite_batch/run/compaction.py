"""The compaction driver: hold the transcripts' lease while output/compact.py merges small files."""

from __future__ import annotations

from granite_batch.output.compact import DEFAULT_TARGET_MB, Compaction, compact_dataset
from granite_batch.run.bookkeeping import new_run_id
from granite_batch.run.lease import LeaseTerms, take_lease
from granite_batch.schema import TRANSCRIPTS_DIR
from granite_batch.storage import OutputRoot


def compact_output(
    output: OutputRoot,
    target_mb: float = DEFAULT_TARGET_MB,
    terms: LeaseTerms = LeaseTerms(),
) -> Compaction:
    """Merge the small files of each language partition of OUTPUT/transcripts into files of about
    `target_mb`, holding the dataset's lease as a run does (so a run started meanwhile waits, and
    this waits for a run). Raises LeaseHeld / LeaseUnsupported as a run does."""
    compaction_id = f"compact-{new_run_id()}"
    lease = take_lease(output, TRANSCRIPTS_DIR, compaction_id, terms)
    try:
        return compact_dataset(output, compaction_id, target_mb, before_commit=lease.check)
    finally:
        lease.release()
