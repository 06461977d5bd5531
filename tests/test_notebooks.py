"""The notebooks run top to bottom on a real output (the tiny checkpoint's) and save their figures; the
committed copies carry their outputs and find the repository root from wherever they are opened."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import nbformat
import pytest
from nbclient import NotebookClient

from conftest import REPO, SAMPLES, run_cli, write_jsonl
from granite_batch import evaluate, results

NOTEBOOKS = REPO / "notebooks"
SAMPLE_ROWS = [json.loads(line) for line in (SAMPLES / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def job_output(tmp_path_factory, tiny_model_dir) -> Path:
    """One run of the job over the samples plus a missing recording (so one row fails)."""
    work = tmp_path_factory.mktemp("notebook-job")
    rows = [dict(row, audio=str(SAMPLES / row["audio"])) for row in SAMPLE_ROWS]
    rows.append({"audio": str(work / "missing.flac"), "language": "de", "reference": "Gute Nacht."})
    manifest = write_jsonl(work / "manifest.jsonl", rows)
    output = work / "out"
    result = run_cli(
        [
            "run",
            "--manifest",
            str(manifest),
            "--output",
            str(output),
            "--model",
            str(tiny_model_dir),
            "--max-new-tokens",
            "8",
            "--word-timestamps",
            "--no-progress",
            "--run-id",
            "notebook-run",
        ]
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return output


def execute(name: str, **settings: str) -> nbformat.NotebookNode:
    """Run notebooks/<name>.ipynb in a fresh kernel with GRANITE_BATCH_* settings; return it with outputs.
    A cell that raises fails the test (nbclient raises CellExecutionError)."""
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    env = {**os.environ, **{f"GRANITE_BATCH_{key.upper()}": value for key, value in settings.items()}}
    client = NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute(env=env)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "a cell did not run"
    assert not [o for cell in code for o in cell.outputs if o.output_type == "error"]
    return notebook


def printed(notebook: nbformat.NotebookNode) -> str:
    """Everything the notebook printed or displayed as text."""
    parts = []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", "") or output.get("data", {}).get("text/plain", ""))
    return "\n".join(parts)


def assert_figures(folder: Path, names: list[str]) -> None:
    for name in names:
        image = matplotlib.image.imread(folder / f"{name}.png")
        assert image.shape[0] >= 200 and image.shape[1] >= 400, name
        assert image.std() > 0.01, f"{name} is blank"


NAMES = ["explore_results", "evaluate_quality", "run_a_small_job"]
FIGURES_SHOWN = {"explore_results": 4, "evaluate_quality": 3, "run_a_small_job": 1}


@pytest.mark.parametrize("name", NAMES)
def test_notebooks_are_committed_with_their_outputs(name):
    """A reader on the web (and the docs site) sees every cell's output: `python
    notebooks/refresh_outputs.py` ran them on the samples; nothing of the machine it ran on is saved."""
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.execution_count for cell in code), "run python notebooks/refresh_outputs.py"
    outputs = [output for cell in code for output in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) == FIGURES_SHOWN[name]
    saved = json.dumps(outputs)
    for machine_path in ("/tmp/", "/work/", "/home/", "/root/"):
        assert machine_path not in saved, machine_path


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("opened_from", ["notebooks", "root"])
def test_notebook_defaults_find_the_repository_root(name, opened_from, tmp_path):
    """Opened from notebooks/ or from the root, a notebook's default output is the out/ the Quick
    start writes at the root (and its samples are the root's)."""
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    settings = next(cell.source for cell in notebook.cells if cell.cell_type == "code")
    script = settings + "\nprint(OUTPUT)\nprint(globals().get('SAMPLES', ''))\n"
    env = {key: value for key, value in os.environ.items() if not key.startswith("GRANITE_BATCH_")}
    env["GRANITE_BATCH_FIGURES"] = str(tmp_path)
    env["MPLBACKEND"] = "Agg"
    cwd = NOTEBOOKS if opened_from == "notebooks" else REPO
    done = subprocess.run([sys.executable, "-c", script], cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    output, samples = done.stdout.splitlines()[-2:]
    assert Path(output) == REPO / "out"
    if name == "run_a_small_job":
        assert Path(samples) == SAMPLES


def test_explore_results(job_output, tmp_path):
    notebook = execute("explore_results", output=str(job_output), figures=str(tmp_path))
    assert_figures(tmp_path, ["rows_and_audio_per_language", "duration_histogram", "error_reasons", "segment_words"])
    text = printed(notebook)
    assert " words" in text and "no segment has words" not in text  # the timeline shows a segment's words
    assert f"{len(SAMPLE_ROWS) + 1} rows from 1 run(s)" in text
    assert "not found" in text  # the failed row and its reason, in pandas and in SQL


def test_evaluate_quality(job_output, tmp_path):
    notebook = execute("evaluate_quality", output=str(job_output), figures=str(tmp_path))
    assert_figures(tmp_path, ["asr_error_rate_by_language", "ast_scores_by_pair", "asr_row_error_rates"])
    expected = evaluate.format_report(evaluate.score_table(results.load(str(job_output))))
    assert expected in printed(notebook)
    assert f"{len(SAMPLE_ROWS)} rows scored, 1 skipped (failed row: 1)" in expected


@pytest.mark.slow
def test_run_a_small_job(tiny_model_dir, tmp_path):
    output = tmp_path / "out"
    execute(
        "run_a_small_job",
        output=str(output),
        model=str(tiny_model_dir),
        max_new_tokens="8",
        samples=str(SAMPLES),
        figures=str(tmp_path / "figures"),
    )
    assert_figures(tmp_path / "figures", ["small_job_recordings"])
    (run,) = results.runs(str(output))
    assert run["status"] == "succeeded" and run["rows_ok"] == len(SAMPLE_ROWS)
    table = results.load(str(output))
    assert table.num_rows == len(SAMPLE_ROWS)
    assert set(table.column("run_id").to_pylist()) == {run["run_id"]}
    assert sorted(table.column("reference").to_pylist()) == sorted(row["reference"] for row in SAMPLE_ROWS)
