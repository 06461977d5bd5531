"""The evaluation driver: score an output root against its references."""

from __future__ import annotations

import posixpath
from datetime import UTC, datetime

from granite_batch import results
from granite_batch.schema import (
    EVAL_DIR,
)
from granite_batch.storage import OutputRoot, write_json


def evaluate_output(
    output: OutputRoot,
    run_id: str | None = None,
    language: str | None = None,
    task: str | None = None,
) -> tuple[dict, str]:
    """Score the rows of one run of an output root (the newest when `run_id` is None; every row
    when it is "all"), optionally of one language and task, and write the report to
    `OUTPUT/eval/<run_id>.json` (`<run_id>.language=L.task=T.json` when filtered).
    Returns (report, its path). Raises ValueError when the root has no run to score."""
    from granite_batch.evaluate import score_table

    if run_id != "all":
        known = [summary["run_id"] for summary in results.runs(output)]
        if not known:
            raise ValueError(f"no runs under {output.uri}/runs; give --run all to score every row")
        if run_id is not None and run_id not in known:
            raise ValueError(f"no run {run_id} under {output.uri}/runs; newest: {known[-1]}")
        run_id = run_id or known[-1]
    table = results.load(output, language=language, task=task, run_id=None if run_id == "all" else run_id)
    filters = {"language": language, "task": task}
    report = {
        "run_id": run_id,
        "output": output.uri,
        "filters": filters,
        "evaluated_at": datetime.now(UTC).isoformat(),
        "models": sorted(set(table.column("model").to_pylist())) if "model" in table.column_names else [],
        **score_table(table),
    }
    name = run_id + "".join(f".{key}={value}" for key, value in filters.items() if value)
    return report, write_json(output, posixpath.join(EVAL_DIR, f"{name}.json"), report)
