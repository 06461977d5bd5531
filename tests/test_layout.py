"""The package's house: rooms that mirror the pipeline, layers that point one way, no import circle.

Imports are read from the source (every `import` and `from ... import`, at module level or inside
functions), so a lazy import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import REPO

PACKAGE = REPO / "jobs" / "granite_batch"
# Each room (a subpackage, or a top-level module) and the rooms it may import, from the top down:
# cli -> drivers (run/) -> results -> pipeline (the one Ray module) -> stages -> helpers.
MAY_IMPORT = {
    "cli": {
        "run",
        "results",
        "pipeline",
        "config",
        "inputs",
        "audio",
        "models",
        "inference",
        "output",
        "second_pass",
        "evaluate",
        "schema",
        "storage",
        "testing",
    },
    "run": {
        "results",
        "pipeline",
        "config",
        "inputs",
        "audio",
        "models",
        "inference",
        "output",
        "second_pass",
        "evaluate",
        "schema",
        "storage",
    },
    "results": {"pipeline", "output", "schema", "storage"},
    "pipeline": {"config", "inputs", "audio", "models", "inference", "output", "second_pass", "schema", "storage"},
    "inference": {"audio", "models", "schema"},
    "second_pass": {"config", "models"},
    "inputs": {"models", "output", "schema", "storage"},
    "audio": {"schema", "storage"},
    "output": {"models", "schema", "storage"},
    "evaluate": {"models"},
    "config": {"models", "layers"},
    "layers": set(),
    "models": set(),
    "testing": set(),
    "schema": set(),
    "storage": set(),
}
# Run on a bare GPU machine (benchmarks/bench_gpu.py): torch, numpy and transformers only.
TORCH_ONLY = ("models", "testing")
NOT_ON_A_GPU_MACHINE = {"pyarrow", "ray", "av", "soxr", "fsspec", "pydantic"}
# A module does one job; past this it is doing two (lines as ruff formats them).
MAX_MODULE_LINES = 600


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> tuple[set[str], set[str]]:
    """(package modules, other top-level packages) that `path` imports anywhere in its source."""
    ours: set[str] = set()
    others: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "granite_batch":
                ours.update(alias.name for alias in node.names)
            elif node.module.startswith("granite_batch."):
                module = node.module.removeprefix("granite_batch.")
                # `from granite_batch.audio import vad` names a module; `from granite_batch.schema import X` a name
                ours.update(
                    f"{module}.{a.name}" if (PACKAGE / module.replace(".", "/") / f"{a.name}.py").exists() else module
                    for a in node.names
                )
            else:
                others.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("granite_batch."):
                    ours.add(alias.name.removeprefix("granite_batch."))
                else:
                    others.add(alias.name.split(".")[0])
    return ours, others


def package_imports() -> dict[str, set[str]]:
    """Module name (`audio.vad`, `pipeline`) -> the package modules it imports."""
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        name = module_name(path)
        graph[name] = imports_of(path)[0] - {name}
    return graph


def room(module: str) -> str:
    return module.split(".")[0]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_cycle_finder_finds_a_planted_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_circle_in_the_package():
    assert find_cycle(package_imports()) is None


def test_every_room_is_known_and_layers_point_one_way():
    graph = package_imports()
    rooms = {room(module) for module in graph if module}
    assert rooms == set(MAY_IMPORT), "a room was added or renamed: say here what it may import"
    for module, imported in graph.items():
        if not module:
            continue  # the package's face (__init__) hands the public API on
        wrong = {room(m) for m in imported} - MAY_IMPORT[room(module)] - {room(module)}
        assert not wrong, f"{module} imports {wrong}, which its room may not"


def test_the_rooms_mirror_the_pipeline():
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()} == {
        "inputs",
        "audio",
        "models",
        "inference",
        "output",
        "second_pass",
        "run",
        "testing",
        "cli",
        "pipeline",
    }


def test_ray_is_imported_in_the_pipeline_room_alone():
    for path in PACKAGE.rglob("*.py"):
        if "ray" in imports_of(path)[1]:
            assert room(module_name(path)) == "pipeline", path


def test_model_code_needs_neither_arrow_nor_ray():
    for folder in TORCH_ONLY:
        for path in (PACKAGE / folder).rglob("*.py"):
            assert not imports_of(path)[1] & NOT_ON_A_GPU_MACHINE, path


def test_no_module_is_a_house_of_its_own():
    for path in PACKAGE.rglob("*.py"):
        lines = len(path.read_text(encoding="utf-8").splitlines())
        assert lines <= MAX_MODULE_LINES, f"{path.relative_to(REPO)} has {lines} lines: split it by job"


def test_the_layout_test_sees_a_planted_wrong_import(tmp_path):
    planted = tmp_path / "m.py"
    planted.write_text("from granite_batch.run.transcription import run_job\nimport ray\n")
    ours, others = imports_of(planted)
    assert ours == {"run.transcription"} and "ray" in others


def test_no_benchmark_code_inside_the_package():
    assert not list(PACKAGE.rglob("bench*.py"))
    assert {p.name for p in (REPO / "benchmarks").glob("bench_*.py")} >= {
        "bench_gpu.py",
        "bench_pipeline.py",
        "bench_segment.py",
    }
