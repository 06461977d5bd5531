"""Checks of the output root a driver makes before any work: what would fail later, or destroy
committed rows, is refused up front with a message that says what to do (exit 2 from the CLI)."""

from __future__ import annotations

import posixpath

from granite_batch.config import ConfigError
from granite_batch.storage import OutputRoot

# Where a run's files are named with its id (output.py names them so); its summary is checked by
# the driver's _Run.
_RUN_FILES = ("transcripts/*/part-{run_id}-*.parquet", "_staging/{run_id}")


def check_output_root(output: OutputRoot) -> None:
    """Raise ConfigError when `output` names an existing file (or object) instead of a folder."""
    fs, root = output.fs_and_path
    try:
        kind = fs.info(root).get("type")
    except FileNotFoundError:
        return  # created on the first write
    if kind not in ("directory", None):
        raise ConfigError(
            f"output {output.uri} is a {'file' if kind == 'file' else kind}, not a folder: "
            "--output names the dataset root (a folder or prefix)"
        )


def check_run_id_unused(output: OutputRoot, run_id: str) -> None:
    """Raise ConfigError when `run_id` already has files or staged files under the output root
    (`part-<run_id>-<n>.parquet`): a second run with the same id would replace them."""
    fs, root = output.fs_and_path
    for pattern in _RUN_FILES:
        path = posixpath.join(root, pattern.format(run_id=run_id))
        found = fs.glob(path) if "*" in path else ([path] if fs.exists(path) else [])
        if found:
            raise ConfigError(
                f"run id {run_id} already exists in {output.uri} ({posixpath.relpath(found[0], root)}): "
                "a new run needs a new --run-id (leave it out for a fresh one); the remaining rows "
                "of an unfinished run are done by a run with another id"
            )
