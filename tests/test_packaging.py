"""What users install: a wheel holding every module and the `granite-batch` command, whose declared
ranges hold the exact set CI runs (constraints.txt)."""

from __future__ import annotations

import email
import os
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from conftest import REPO

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
LOCK = {
    canonicalize_name(name): version
    for name, version in re.findall(r"^([A-Za-z0-9_.\-]+)==(\S+)$", (REPO / "constraints.txt").read_text(), re.M)
}


def declared() -> list[Requirement]:
    """What CI installs: the dependencies and every extra but `notebooks` (JupyterLab, for people)."""
    project = PYPROJECT["project"]
    extras = [deps for name, deps in project["optional-dependencies"].items() if name != "notebooks"]
    return [Requirement(dep) for dep in project["dependencies"] + sum(extras, [])]


def test_every_declared_range_holds_the_version_ci_runs():
    for requirement in declared():
        name = canonicalize_name(requirement.name)
        assert name in LOCK, f"{name} is declared but not in constraints.txt: refresh the lock"
        assert requirement.specifier.contains(LOCK[name], prereleases=True), (
            f"constraints.txt has {name}=={LOCK[name]}, outside pyproject.toml's {requirement}"
        )


def test_runtime_dependencies_are_ranges_not_pins():
    for requirement in map(Requirement, PYPROJECT["project"]["dependencies"]):
        operators = {spec.operator for spec in requirement.specifier}
        if requirement.name == "torchaudio":  # exact on purpose (pyproject.toml says why)
            continue
        assert operators == {">=", "<"}, f"{requirement}: give a range >=tested,<next"
    assert "granite-batch" not in LOCK, "the lock must not pin the package itself"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = out / "source"  # a copy: the build leaves build/ and egg-info behind in the tree it builds
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    shutil.copytree(REPO / "jobs", source / "jobs", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    # No build isolation: the CI venv's setuptools builds it, without reaching an index.
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(source)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (built,) = out.glob("granite_batch-*.whl")
    return built


def test_the_wheel_holds_every_module_the_command_and_the_ranges(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        info = next(name for name in names if name.endswith(".dist-info/METADATA"))
        metadata = email.message_from_bytes(archive.read(info))
        entry_points = archive.read(info.replace("METADATA", "entry_points.txt")).decode()
    package = REPO / "jobs"
    modules = {str(path.relative_to(package)) for path in (package / "granite_batch").rglob("*.py")}
    assert modules and modules <= names, sorted(modules - names)
    assert "granite-batch = granite_batch.cli:main" in entry_points
    requires = {str(Requirement(line)) for line in metadata.get_all("Requires-Dist")}
    assert {str(Requirement(dep)) for dep in PYPROJECT["project"]["dependencies"]} <= requires


def test_the_installed_wheel_runs_from_itself(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
        timeout=300,
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = "import granite_batch.cli, granite_batch.config; print(granite_batch.cli.__file__)"
    where = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(target), where.stdout  # not the checkout
    schema = subprocess.run(
        [sys.executable, "-m", "granite_batch.cli", "config", "schema"], env=env, capture_output=True, cwd=tmp_path
    )
    assert schema.returncode == 0 and b'"Resources"' in schema.stdout, schema.stderr


@pytest.mark.slow
def test_the_wheel_installs_into_a_fresh_venv_with_the_lock(wheel, tmp_path):
    """A user's install: a new venv, the wheel and its dependencies at the locked versions (minutes, GBs)."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install"]
    install = subprocess.run(
        [*pip, "-c", str(REPO / "constraints.txt"), str(wheel)], capture_output=True, text=True, timeout=1800
    )
    assert install.returncode == 0, install.stdout[-3000:] + install.stderr[-3000:]
    assert (venv / "bin" / "granite-batch").exists(), install.stdout[-3000:]
    result = subprocess.run(
        [str(venv / "bin" / "granite-batch"), "config", "show", "--manifest", "m.jsonl", "--output", "out"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "model: ibm-granite/granite-4.0-1b-speech" in result.stdout
