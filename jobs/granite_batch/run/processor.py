"""`build_processor(config)`: the job's transform as a function from a Ray Dataset of recordings to a
Ray Dataset of transcript rows, for users who read and write their data themselves (as Ray Data LLM's
`build_llm_processor(config)(ds)`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from granite_batch import pipeline
from granite_batch.config import JobConfig, load_config
from granite_batch.pipeline import JobModel
from granite_batch.run.bookkeeping import new_run_id
from granite_batch.run.transcription import resolve_job_models

if TYPE_CHECKING:
    from granite_batch.pipeline import Dataset

# A config built for a processor names no manifest and no output: the Dataset is both.
NO_FILES = "(a Ray Dataset: no manifest, no output)"


@dataclass(frozen=True)
class Processor:
    """Call it on a Ray Dataset of recordings to get the lazy Dataset of their transcript rows."""

    config: JobConfig
    models: list[JobModel]
    run_id: str

    def __call__(self, recordings: Dataset) -> Dataset:
        """One transcript row per input row, in the Parquet output's schema (schema.transcript_schema:
        every contract column, then the input's other columns); nothing is written. Input rows are
        manifest rows: `audio` (a path or URI, the recording's bytes, or Hugging Face's `Audio`
        struct {"bytes", "path"}; a `path` column stands for it, and `read_binary_files`'
        `bytes`+`path` rows work as they are), and optional `id`, `language`, `task`,
        `target_language`, `keywords`, `reference`. Ids must be unique within the Dataset (the
        default, a digest of the recording and its request, is); a bad row becomes a row with
        `error`, as in the job."""
        return pipeline.transcript_rows(recordings, self.config, self.models, self.run_id)


def build_processor(config: JobConfig | dict[str, Any] | None = None, **fields: Any) -> Processor:
    """The job's transform for a Ray Dataset: `build_processor({"model": "ibm-granite/granite-4.0-1b-speech"})(ds)`.

    `config` is a JobConfig or a dict of its fields (`fields` are more of them, winning over the
    dict); `manifest`, `input` and `output` are not used. The models are resolved now (their exact
    revision, on every row's `model_revision`), so a bad model id raises here (ModelLoadError), not
    in the middle of the Dataset's execution; every row's `run_id` is this processor's own."""
    if not isinstance(config, JobConfig):
        given = {**(config or {}), **fields}
        if given.get("manifest") is None and given.get("input") is None:
            given["manifest"] = NO_FILES
        config = load_config(overrides={"output": NO_FILES, **given})
    elif fields:
        config = config.model_copy(update=fields)
    return Processor(config, resolve_job_models(config), config.run_id or new_run_id())
