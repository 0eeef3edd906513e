"""Imports go one way, with no cycles: app (the CLI and what only it uses) -> flows -> tasks -> engine
(everything else in dpoflow/: training, data, models, config and the other base modules). Read from
the source with `ast`, every import counted, also those inside functions (a lazy import is still a
dependency, and a cycle through one breaks as soon as someone moves it to the top)."""

import ast
from pathlib import Path

# Where each package's source lives (pyproject.toml's package-dir).
PACKAGE_DIRS = {"dpoflow": "dpoflow", "dpoflow.flows": "flows", "dpoflow.tasks": "tasks"}

# Layers, top first: a module may import its own layer and the ones below it, never one above.
LAYERS = ("app", "flows", "tasks", "engine")
APP = {"dpoflow.__main__", "dpoflow.cli", "dpoflow.doctor", "dpoflow.deploy", "dpoflow.wizard", "dpoflow.schema"}


def layer(module: str) -> str:
    if module in APP:
        return "app"
    for package in ("dpoflow.flows", "dpoflow.tasks"):
        if module == package or module.startswith(package + "."):
            return package.split(".")[1]
    return "engine"


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGE_DIRS.items():
        for file in (root / folder).rglob("*.py"):
            parts = file.relative_to(root / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join((package, *parts))] = file
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    """module -> the modules of the package it imports (`from pkg import name` counts as pkg.name when
    that is a module, else as pkg)."""
    files = modules(root)

    def known(name: str) -> str:
        while name not in files:
            name = name.rsplit(".", 1)[0]
        return name

    graph = {}
    for module, file in files.items():
        package = module if file.name == "__init__.py" else module.rsplit(".", 1)[0]
        imported = set()
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                imported |= {known(a.name) for a in node.names if a.name.split(".")[0] == "dpoflow"}
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[:len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if target.split(".")[0] != "dpoflow":
                    continue
                imported |= {f"{target}.{a.name}" if f"{target}.{a.name}" in files else known(target)
                             for a in node.names}
        graph[module] = imported - {module}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path round each cycle found by a depth-first walk (empty: the graph is acyclic)."""
    found, done, path = [], set(), []

    def visit(module: str) -> None:
        path.append(module)
        for imported in sorted(graph.get(module, ())):
            if imported in path:
                found.append(path[path.index(imported):] + [imported])
            elif imported not in done:
                visit(imported)
        path.pop()
        done.add(module)

    for module in sorted(graph):
        if module not in done:
            visit(module)
    return found


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    return [f"{module} ({layer(module)}) imports {imported} ({layer(imported)})"
            for module, imported_modules in sorted(graph.items()) for imported in sorted(imported_modules)
            if rank[layer(imported)] < rank[layer(module)]]


def test_the_package_imports_one_way_without_cycles(repo):
    graph = import_graph(repo)
    # The walk sees the package: its stages, flows and CLI, and what they import.
    assert {"dpoflow.cli", "dpoflow.flows.pipeline", "dpoflow.tasks.dpo", "dpoflow.training"} <= set(graph)
    assert {"dpoflow.training", "dpoflow.distributed", "dpoflow.tasks"} <= graph["dpoflow.tasks.dpo"]
    assert "dpoflow.flows.explain" in graph["dpoflow.cli"]
    assert cycles(graph) == []
    assert upward_imports(graph) == []


def test_a_stage_never_imports_another_stage(repo):
    graph = import_graph(repo)
    stages = {m for m in graph if m.startswith("dpoflow.tasks.")}
    assert {"dpoflow.tasks.dpo", "dpoflow.tasks.prepare"} <= stages
    assert {m: graph[m] & stages for m in stages if graph[m] & stages} == {}


def test_the_checks_find_a_cycle_and_an_upward_import(tmp_path):
    for folder in PACKAGE_DIRS.values():
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    (tmp_path / "dpoflow" / "training.py").write_text("def f():\n    from .distributed import world_size\n")
    (tmp_path / "dpoflow" / "distributed.py").write_text("from dpoflow import training\n")
    (tmp_path / "tasks" / "dpo.py").write_text("from . import stage_task\nfrom dpoflow.flows.pipeline import x\n")
    (tmp_path / "flows" / "pipeline.py").write_text("import dpoflow.tasks.dpo\n")
    graph = import_graph(tmp_path)
    assert graph["dpoflow.distributed"] == {"dpoflow.training"}
    assert graph["dpoflow.tasks.dpo"] == {"dpoflow.tasks", "dpoflow.flows.pipeline"}
    assert sorted(cycles(graph)) == [["dpoflow.distributed", "dpoflow.training", "dpoflow.distributed"],
                                     ["dpoflow.flows.pipeline", "dpoflow.tasks.dpo", "dpoflow.flows.pipeline"]]
    assert upward_imports(graph) == ["dpoflow.tasks.dpo (tasks) imports dpoflow.flows.pipeline (flows)"]
