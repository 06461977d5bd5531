"""Run the notebooks on the sample recordings with the tiny checkpoint and save them with their outputs.

    python notebooks/refresh_outputs.py            # from the repository root, package installed

The committed notebooks carry these outputs so that a reader on the web, and the docs site, see the
tables and figures. Each notebook runs as a newcomer would run it: in a scratch copy of the
repository's layout (a pyproject.toml, samples/, notebooks/), from notebooks/, with no
GRANITE_BATCH_OUTPUT set, so its defaults find out/ at the root. Paths of the scratch copy are written
relative to it, and stderr (Ray's progress and logs) is left out of the saved copies.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "notebooks"
RUN_ID = "sample-run"


def scratch_root(parent: Path, name: str) -> Path:
    """A folder laid out like the repository: the marker the notebooks walk up to, samples/, notebooks/."""
    root = parent / name
    (root / "notebooks").mkdir(parents=True)
    (root / "pyproject.toml").write_text("# scratch root for notebooks/refresh_outputs.py\n", encoding="utf-8")
    shutil.copytree(ROOT / "samples", root / "samples")
    return root


def environment(**settings: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("GRANITE_BATCH_")}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "jobs"), env.get("PYTHONPATH")]))
    env.update({f"GRANITE_BATCH_{key.upper()}": value for key, value in settings.items()})
    return env


def run_samples_job(root: Path, model: Path) -> None:
    """The job over the samples plus one missing recording (so the notebooks show a failed row)."""
    rows = [json.loads(line) for line in (root / "samples" / "manifest.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = [dict(row, audio=f"samples/{row['audio']}") for row in rows]
    rows.append({"audio": "samples/missing.flac", "language": "de", "reference": "Gute Nacht."})
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    command = [sys.executable, "-m", "granite_batch.cli", "run", "--manifest", str(manifest)]
    command += ["--output", str(root / "out"), "--model", str(model), "--max-new-tokens", "8"]
    command += ["--word-timestamps", "--no-progress", "--run-id", RUN_ID]
    subprocess.run(command, check=True, env=environment(), cwd=root)


def execute(name: str, root: Path, env: dict[str, str]) -> nbformat.NotebookNode:
    notebook = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(root / "notebooks")}}
    )
    client.execute(env=env)
    return notebook


def relative(value, roots: list[Path]):
    """`value` with the scratch roots' paths written relative to them."""
    if isinstance(value, str):
        for root in roots:
            value = value.replace(f"{root}/", "").replace(str(root), ".")
        return value
    if isinstance(value, list):
        return [relative(item, roots) for item in value]
    return value


def cleaned(notebook: nbformat.NotebookNode, roots: list[Path]) -> nbformat.NotebookNode:
    for cell in notebook.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.outputs:
            if output.output_type == "stream" and output.name == "stderr":
                continue
            if "text" in output:
                output.text = relative(output.text, roots)
            for kind, data in output.get("data", {}).items():
                if kind.startswith("text/"):
                    output.data[kind] = relative(data, roots)
            kept.append(output)
        cell.outputs = kept
    return notebook


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="granite-notebooks-") as tmp:
        scratch = Path(tmp)
        model = scratch / "tiny-granite"
        subprocess.run(
            [sys.executable, "-m", "granite_batch.cli", "tiny-model", str(model)], check=True, env=environment()
        )
        explore = scratch_root(scratch, "repo")
        run_samples_job(explore, model)
        small = scratch_root(scratch, "small-job")
        roots = [explore, small, scratch]
        plans = [
            ("explore_results", explore, environment()),
            ("evaluate_quality", explore, environment()),
            ("run_a_small_job", small, environment(model=str(model), max_new_tokens="8")),
        ]
        for name, root, env in plans:
            print(f"executing {name}", flush=True)
            notebook = cleaned(execute(name, root, env), roots)
            nbformat.validate(notebook)
            nbformat.write(notebook, NOTEBOOKS / f"{name}.ipynb")
    return 0


if __name__ == "__main__":
    sys.exit(main())
