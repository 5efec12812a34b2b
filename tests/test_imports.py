"""The import graph of the harness (every import, function-level ones included): no module cycles.

`from package import submodule` depends on the submodule only: the package's __init__ runs first for any
import from inside it, so counting it would make every package that re-exports its modules a "cycle"."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"bench": "bench", "methods": "bench.methods", "baselines": "bench.baselines"}


def module_graph() -> dict[str, set[str]]:
    files = {}
    for folder, package in PACKAGES.items():
        for path in (ROOT / folder).rglob("*.py"):
            parts = [p for p in path.relative_to(ROOT / folder).with_suffix("").parts if p != "__init__"]
            files[".".join([package, *parts])] = path
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        deps: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = {f"{node.module}.{a.name}" for a in node.names} & files.keys()
                deps |= submodules
                if len(submodules) < len(node.names):  # names defined by the module itself (not only its submodules)
                    deps |= {node.module} & files.keys()
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names} & files.keys()
        graph[name] = deps - {name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[set[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(component)

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_is_read() -> None:
    graph = module_graph()
    assert "bench.report.frame" in graph["bench.report.summary"] and "bench.report.frame" in graph["bench.report.plots"]
    assert "bench.methods.dpsad_common" in graph["bench.methods.dpsad"]
    assert "bench.metrics.protocols" in graph["bench.metrics.downstream"]  # `from bench.metrics import protocols`
    assert "bench.metrics" not in graph["bench.metrics.downstream"]
    assert "bench.metrics" in graph["bench.report.paper"]  # `from bench.metrics import METRICS, ...`


def test_no_import_cycles() -> None:
    assert cycles(module_graph()) == []


def test_the_check_catches_a_cycle() -> None:
    graph = module_graph()
    graph["bench.report.frame"] = graph["bench.report.frame"] | {"bench.report"}
    assert any({"bench.report.frame", "bench.report"} <= c for c in cycles(graph))


# The declared layering, bottom up: an arrow against it fails the test (test_the_check_catches_an_upward_arrow).
# privacy is the floor every method and the grid stand on: it imports nothing of the harness but errors and the
# contract; a method imports no part of the grid, the reports or the CLI (it is run by them, never runs them); the
# networks and the pixel-range helpers import no diffusion code (a GAN method never climbs into it).
FLOOR = ("bench.errors", "bench.contract", "bench.privacy")
ABOVE_METHODS = ("bench.grid", "bench.cli", "bench.report", "bench.audit", "bench.runner", "bench.registry")


# reporting (the bench.report package) reads results (bench.grid.store) and never plans or runs: a paper's table
# comes from its recorded plan (bench.report.paper), its planning and running are bench.grid.paper_plan's. The
# bench.grid package itself counts as execution (its __init__ imports the runner).
REPORTING = ("bench.report",)
EXECUTION = (
    "bench.grid.planning",
    "bench.grid.runner",
    "bench.grid.executors",
    "bench.grid.run",
    "bench.grid.paper_plan",
    "bench.grid.shared",
    "bench.audit",
    "bench.cli",
    "bench.runner",
)


def _in(module: str, packages: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in packages)


def upward_arrows(graph: dict[str, set[str]]) -> list[tuple[str, str]]:
    arrows = []
    for module, deps in graph.items():
        for dep in deps:
            if _in(module, ("bench.privacy",)) and not _in(dep, FLOOR):
                arrows.append((module, dep))
            if _in(module, ("bench.methods", "bench.baselines")) and _in(dep, ABOVE_METHODS):
                arrows.append((module, dep))
            if _in(module, REPORTING) and (_in(dep, EXECUTION) or dep == "bench.grid"):
                arrows.append((module, dep))
            if _in(module, ("bench.nets", "bench.pixels")) and _in(dep, ("bench.diffusion",)):
                arrows.append((module, dep))  # the networks and pixel ranges sit below the diffusion code
    return sorted(arrows)


def test_no_arrow_runs_against_the_layering() -> None:
    assert upward_arrows(module_graph()) == []


def test_the_check_catches_an_upward_arrow() -> None:
    graph = module_graph()
    graph["bench.privacy.ledger"] = graph["bench.privacy.ledger"] | {"bench.grid"}
    graph["bench.baselines.dpdm"] = graph["bench.baselines.dpdm"] | {"bench.report"}
    graph["bench.nets.gan"] = graph["bench.nets.gan"] | {"bench.diffusion"}
    graph["bench.report.paper"] = graph["bench.report.paper"] | {"bench.grid"}
    graph["bench.report.frame"] = graph["bench.report.frame"] | {"bench.grid.planning"}
    assert "bench.grid.store" in graph["bench.report.frame"]  # reading the store is allowed
    assert upward_arrows(graph) == [
        ("bench.baselines.dpdm", "bench.report"),
        ("bench.nets.gan", "bench.diffusion"),
        ("bench.privacy.ledger", "bench.grid"),
        ("bench.report.frame", "bench.grid.planning"),
        ("bench.report.paper", "bench.grid"),
    ]
