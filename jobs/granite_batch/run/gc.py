"""What dead runs left in an output root, found and removed (`granite-batch gc`).

A run stages its files and its plan under `OUTPUT/_staging/<run_id>/` and removes that folder when it
ends; a run killed hard (SIGKILL, a lost node) leaves it behind, plan files included (about 17 GB at
100 M manifest rows). A folder is a dead run's when no live lease names its run (run/lease.py: a
record neither released nor past its expiry) and nothing in it changed for `older_than_s`; a live
run's folder is never touched, whatever its age.
"""

from __future__ import annotations

import logging
import posixpath
import time
from dataclasses import dataclass
from datetime import datetime

from granite_batch.run.lease import read_holder
from granite_batch.schema import SECOND_PASS_DIR, STAGING_DIR, TRANSCRIPTS_DIR
from granite_batch.storage import OutputRoot

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Leftover:
    """One staging folder of a run: whose, how big, how long untouched, and whether gc may remove it."""

    path: str
    run_id: str
    files: int
    bytes: int
    idle_s: float | None  # since its newest file changed; None when the storage gives no times
    removable: bool
    why: str


def _modified(info: dict) -> float | None:
    """A file's modification time (epoch seconds) from an fsspec info dict, local or object storage."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "modified"):
        value = info.get(key)
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, datetime):
            return value.timestamp()
        if isinstance(value, str):
            try:
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
            except ValueError:
                continue
    return None


def live_runs(output: OutputRoot) -> set[str]:
    """Run ids holding a live lease on a dataset of the output (transcripts or a second pass)."""
    fs, passes = output.fs, output.join(SECOND_PASS_DIR)
    datasets = [TRANSCRIPTS_DIR]
    if fs.isdir(passes):
        datasets += [posixpath.join(SECOND_PASS_DIR, posixpath.basename(p)) for p in fs.ls(passes, detail=False)]
    live = set()
    for dataset in datasets:
        holder = read_holder(output, dataset)
        age = None if holder is None else holder.renewed_age_s()
        if holder is not None and (age is None or age < holder.expiry_s):
            live.add(holder.run_id)
    return live


def find_leftovers(output: OutputRoot, older_than_s: float) -> list[Leftover]:
    """Every folder under `OUTPUT/_staging`, oldest first, each marked removable or not (and why)."""
    fs, staging = output.fs, output.join(STAGING_DIR)
    if not fs.isdir(staging):
        return []
    live = live_runs(output)
    now = time.time()
    found = []
    for folder in sorted(fs.ls(staging, detail=False)):
        run_id = posixpath.basename(folder.rstrip("/"))
        files = fs.find(folder, detail=True) if fs.isdir(folder) else {folder: fs.info(folder)}
        times = [t for t in (_modified(info) for info in files.values()) if t is not None]
        idle_s = now - max(times) if times else None
        # `_staging/rewrite` is the lease holder's (output.committed.drop_rows): live while anyone holds it.
        if run_id in live or (run_id == "rewrite" and live):
            removable, why = False, "its run holds the output's lease: live"
        elif idle_s is not None and idle_s < older_than_s:
            removable, why = False, f"changed {idle_s:.0f} s ago, under --older-than"
        else:
            removable, why = True, "no live lease names its run"
        size = sum(int(info.get("size") or 0) for info in files.values())
        found.append(Leftover(folder, run_id, len(files), size, idle_s, removable, why))
    return sorted(found, key=lambda item: -(item.idle_s or 0.0))


def remove_leftovers(output: OutputRoot, leftovers: list[Leftover]) -> int:
    """Remove the removable `leftovers` (checking again that no live lease names their run) and
    `_staging` itself when it is left empty; returns the bytes removed."""
    fs = output.fs
    live = live_runs(output)
    removed = 0
    for item in leftovers:
        if not item.removable or item.run_id in live:
            continue
        fs.rm(item.path, recursive=True)
        removed += item.bytes
        log.info("removed %s (%d files, %d bytes)", item.path, item.files, item.bytes)
    staging = output.join(STAGING_DIR)
    try:
        if fs.isdir(staging) and not fs.ls(staging, detail=False):
            fs.rmdir(staging)
    except OSError:  # a run started meanwhile
        pass
    return removed
