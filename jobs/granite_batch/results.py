"""A job's output for notebooks and scripts: transcripts as Arrow, pandas or Ray, the run
summaries, and a small job over a list of files.

    from granite_batch import results
    table = results.load("s3://archive/out", language="fr", task="asr")
"""

from __future__ import annotations

import json
import posixpath
import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads

from granite_batch.output import TRANSCRIPT_FIELDS, TRANSCRIPTS_DIR, read_summaries
from granite_batch.storage import filesystem

# `language` lives in the folder names; declared as a plain string so it never comes back as a dictionary.
PARTITIONING = pads.partitioning(pa.schema([("language", pa.string())]), flavor="hive")


def _one_or_many(value: str | Sequence[str] | None) -> list[str] | None:
    return None if value is None else [value] if isinstance(value, str) else list(value)


def _row_filter(language=None, task=None, run_id=None) -> pc.Expression | None:
    condition = None
    for name, value in (("language", language), ("task", task), ("run_id", run_id)):
        values = _one_or_many(value)
        if values is not None:
            term = pc.field(name).isin(values)
            condition = term if condition is None else condition & term
    return condition


def load(output_uri: str | Path, language: str | Sequence[str] | None = None, task: str | Sequence[str] | None = None,
         run_id: str | Sequence[str] | None = None, storage_options: dict | None = None,
         columns: list[str] | None = None) -> pa.Table:
    """Every committed transcript row under `output_uri` (optionally only these languages, tasks
    and runs), as one Arrow table with `language` as a plain string column, the contract's
    columns first, then passthrough columns. Files written by runs with different passthrough
    columns are read together (missing values are null). An output with no transcripts gives an
    empty table with the contract's columns."""
    fs, root = filesystem(str(output_uri), storage_options)
    base = posixpath.join(root, TRANSCRIPTS_DIR)
    if not fs.exists(base):
        return pa.schema(TRANSCRIPT_FIELDS).empty_table()
    dataset = pads.dataset(base, filesystem=fs, format="parquet", partitioning=PARTITIONING)
    # The first file's schema would drop columns that only later runs' files have.
    schemas = [fragment.physical_schema for fragment in dataset.get_fragments()]
    if not schemas:
        return pa.schema(TRANSCRIPT_FIELDS).empty_table()
    schema = pa.unify_schemas([*schemas, PARTITIONING.schema], promote_options="permissive")
    dataset = pads.dataset(base, schema=schema, filesystem=fs, format="parquet", partitioning=PARTITIONING)
    table = dataset.to_table(filter=_row_filter(language, task, run_id), columns=columns)
    contract = [f.name for f in TRANSCRIPT_FIELDS if f.name in table.column_names]
    return table.select(contract + [name for name in table.column_names if name not in contract])


def to_pandas(output_uri: str | Path, **filters):
    """`load(output_uri, **filters)` as a pandas DataFrame."""
    return load(output_uri, **filters).to_pandas()


def to_ray(output_uri: str | Path, language: str | Sequence[str] | None = None, task: str | Sequence[str] | None = None,
           run_id: str | Sequence[str] | None = None, storage_options: dict | None = None):
    """The transcripts as a lazy Ray Dataset, read in parallel by Ray with hive partitioning, so
    `language` is a column; the same rows as `load` with the same filters."""
    import pyarrow.fs as pafs
    import ray
    from ray.data.datasource import Partitioning

    fs, root = filesystem(str(output_uri), storage_options)
    base = posixpath.join(root, TRANSCRIPTS_DIR)
    arrow_fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs))
    languages = _one_or_many(language)
    paths = [posixpath.join(base, f"language={lang}") for lang in languages] if languages else base
    ds = ray.data.read_parquet(
        paths, filesystem=arrow_fs, ignore_missing_paths=True,
        partitioning=Partitioning("hive", base_dir=base, field_types={"language": str}, filesystem=arrow_fs),
    )
    condition = _row_filter(task=task, run_id=run_id)
    if condition is not None:
        ds = ds.map_batches(lambda batch: batch.filter(condition), batch_format="pyarrow")
    return ds


def runs(output_uri: str | Path, storage_options: dict | None = None) -> list[dict]:
    """Every run summary (`runs/<run_id>.json`) under the output root, oldest first."""
    return read_summaries(str(output_uri), storage_options)


def transcribe_files(paths: Iterable[str | Path | dict], output: str | Path, model: str | None = None,
                     progress: bool = False, **options) -> pa.Table:
    """Run a job over `paths` (recording paths or URIs, or manifest rows as dicts) into `output`
    and return those recordings' rows. `options` are job config fields (`language`, `task`,
    `target_language`, `generation={"max_new_tokens": 64}`, ...). Recordings that already have a
    row in `output` are not redone; their existing rows are returned with the new ones.
    Raises ConfigError, ManifestError, ModelLoadError or TooManyFailures, as `granite-batch run`
    exits on them."""
    from granite_batch.config import load_config
    from granite_batch.manifest import Defaults, read_manifest
    from granite_batch.pipeline import run

    rows = [dict(p) if isinstance(p, dict) else {"audio": str(p)} for p in paths]
    for row in rows:
        # The manifest lives in a temporary folder: relative paths must not resolve against it.
        if "://" not in row["audio"]:
            row["audio"] = str(Path(row["audio"]).resolve())
    with tempfile.TemporaryDirectory(prefix="granite-batch-") as folder:
        manifest_path = Path(folder) / "manifest.jsonl"
        manifest_path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows),
                                 encoding="utf-8")
        overrides = {"manifest": str(manifest_path), "output": str(output), "model": model, **options}
        config = load_config(overrides=overrides)
        defaults = Defaults(config.language, config.task, config.target_language, tuple(config.keywords),
                            tuple(config.allowed_prefixes))
        ids = read_manifest(config.manifest, defaults, config.storage_options).table.column("id")
        run(config, progress=progress)
    table = load(config.output, storage_options=config.storage_options)
    return table.filter(pc.is_in(table.column("id"), value_set=ids.combine_chunks()))

