"""The package's house: layers point one way and no module imports itself back in a circle.

Imports are read from the source (every `import` and `from ... import`, at module level or inside
functions), so a lazy import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast

from conftest import REPO

PACKAGE = REPO / "jobs" / "granite_batch"
# Who may import whom, from the top: CLI -> drivers -> results/pipeline -> stages -> helpers.
DRIVERS = {"cli", "drivers"}
RAY_GRAPHS = {"pipeline"}
STAGES = {"manifest", "audio", "segment", "decode_cut", "transcribe", "model", "speculative", "prompts", "second_pass",
          "second_pass_prompts", "language_model", "subtitles", "evaluate", "output", "plan", "language_id",
          "profiles", "ctc", "engines", "batching", "routing", "tags", "bpe_draft"}


def package_imports() -> dict[str, set[str]]:
    """Module name -> the package modules it imports (anywhere in its source)."""
    graph: dict[str, set[str]] = {}
    for path in sorted(PACKAGE.glob("*.py")):
        name = path.stem
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module:
                if node.module == "granite_batch":
                    imported.update(alias.name for alias in node.names)
                elif node.module.startswith("granite_batch."):
                    imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                imported.update(a.name.split(".")[1] for a in node.names if a.name.startswith("granite_batch."))
        graph[name] = imported - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as a list of modules (first == last), or None."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
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


def test_layers_point_one_way():
    graph = package_imports()
    assert set(graph) >= STAGES | DRIVERS | RAY_GRAPHS, "a module named here was renamed: update this test"
    for stage in STAGES:
        assert not graph[stage] & (DRIVERS | RAY_GRAPHS | {"results"}), (stage, graph[stage])
    assert not graph["pipeline"] & (DRIVERS | {"results"}), graph["pipeline"]
    assert "cli" not in graph["drivers"]


def test_model_code_needs_neither_arrow_nor_ray():
    # model.py runs on a bare GPU machine (benchmarks/bench_gpu.py): torch, numpy and transformers only.
    for module in ("model", "speculative", "prompts", "tiny_model", "alignment", "confidence", "profiles", "ctc",
                   "engines", "batching", "tags", "bpe_draft"):
        source = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
        names = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source))
                 if isinstance(node, (ast.Import, ast.ImportFrom))
                 for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
        assert not names & {"pyarrow", "ray", "av", "soxr", "fsspec", "pydantic"}, (module, names)


def test_no_benchmark_code_inside_the_package():
    assert not list(PACKAGE.glob("bench*.py"))
    assert {p.name for p in (REPO / "benchmarks").glob("bench_*.py")} >= {
        "bench_gpu.py", "bench_pipeline.py", "bench_segment.py"}
