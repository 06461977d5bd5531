"""Rows whose batch was lost to a dying worker: redone alone, then error rows. Plain functions for the
driver; Ray is only named in the options dictionaries it passes to `map_batches`.

The model actor cannot fork its work into a child (CUDA state does not survive a fork), so a row that
crashes it (a native fault in a kernel, the tokenizer, the processor) kills the actor. Ray Data's
actor pools restart a dead actor and retry its task without end by default (`max_restarts=-1`,
`max_task_retries=-1`): one poison batch would crash-loop the job forever. The driver instead:

1. runs the job with the actor restarted but its task not retried (`MODEL_ACTOR_RETRIES`) and lets
   Ray Data drop a batch whose actor died (`DataContext.max_errored_blocks = MAX_LOST_BATCHES`);
2. when fewer rows came back than were planned, finds the lost ones by planning again against what
   is now committed (run/transcription.py, bounded like the first plan) and runs them again one
   recording per block and one segment per model call, so each can only take itself down (an actor
   killed once, by an operator or the OOM killer, costs its batch this second round, nothing more);
3. writes the rows still lost as error rows (`crashed_rows`): "model crashed the worker: ...".

Each death costs an actor restart (the model loaded again), so a poison row costs two.

More than `MAX_LOST_BATCHES` lost batches in one round is not a poison row but a broken stage:
the round then stops the job as before.
"""

from __future__ import annotations

import pyarrow as pa

CRASH_REASON = "model crashed the worker: the model actor died on this row, also alone (see the worker logs)"


def crashed_rows(
    lost: pa.Table,
    schema: pa.Schema,
    model: str | list[str],
    model_revision: str | None | list,
    run_id: str,
    reason: str = CRASH_REASON,
) -> pa.Table:
    """Transcript rows (in `schema`) for the `lost` manifest rows: `error` set to `reason` (a row
    that already had an error keeps it), no text, no segments; `model` and `model_revision` are the
    rows' own (lists, one per row: the models they were routed to) or the same for all."""
    n = lost.num_rows
    if not isinstance(model, list):
        model, model_revision = [model] * n, [model_revision] * n
    errors = (
        [error if error is not None else reason for error in lost.column("error").to_pylist()]
        if "error" in lost.column_names
        else [reason] * n
    )
    filled = {
        "error": pa.array(errors, pa.string()),
        "text": pa.nulls(n, pa.string()),
        "model": pa.array(model, pa.string()),
        "model_revision": pa.array(model_revision, pa.string()),
        "run_id": pa.array([run_id] * n, pa.string()),
    }
    columns = []
    for field in schema:
        if field.name in filled:
            columns.append(filled[field.name].cast(field.type))
        elif field.name == "segments":
            columns.append(pa.array([[]] * n, field.type))
        elif field.name in lost.column_names:
            columns.append(lost.column(field.name).cast(field.type))
        else:
            columns.append(pa.nulls(n, field.type))
    return pa.Table.from_arrays(columns, schema=schema)
