"""Imports go one way, with no cycles: app (the CLI and what only it uses) -> flows -> tasks -> engine
(the work: data, models, training, evaluation, release) -> base (config, records, cache keys and the
other plumbing), each a subpackage of dpoflow named after its layer. Read from the source with `ast`,
every import counted, also those inside functions (a lazy import is still a dependency, and a cycle
through one breaks as soon as someone moves it to the top). The tree is what the package is: every
dpoflow import names a file in it (flows/ and tasks/ through the dpoflow/flows and dpoflow/tasks links),
so tools that read the tree resolve them as Python does."""

import ast
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

# Layers, top first: a module may import its own layer and the ones below it, never one above.
LAYERS = ("app", "flows", "tasks", "engine", "base")


def layer(module: str) -> str:
    if module == "dpoflow.__main__":
        return "app"
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return parts[1]
    return "base" if module == "dpoflow" else "engine"  # the package itself; its data folders' helpers


def modules(root: Path) -> dict[str, Path]:
    """Every module of the dpoflow package in the tree at `root`, by dotted name, reached as Python
    reaches it: through dpoflow/ and the links in it."""
    found = {}
    for folder, _, names in os.walk(root / "dpoflow", followlinks=True):
        for name in names:
            if name.endswith(".py"):
                parts = Path(folder, name).relative_to(root).with_suffix("").parts
                found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = Path(folder, name)
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
    assert {"dpoflow.app.cli", "dpoflow.flows.pipeline", "dpoflow.tasks.dpo", "dpoflow.engine.training"} <= set(graph)
    assert {"dpoflow.engine.training", "dpoflow.engine.distributed", "dpoflow.tasks"} <= graph["dpoflow.tasks.dpo"]
    assert "dpoflow.flows.explain" in graph["dpoflow.app.cli"]
    assert cycles(graph) == []
    assert upward_imports(graph) == []


def test_a_stage_never_imports_another_stage(repo):
    graph = import_graph(repo)
    stages = {m for m in graph if m.startswith("dpoflow.tasks.")}
    assert {"dpoflow.tasks.dpo", "dpoflow.tasks.prepare"} <= stages
    assert {m: graph[m] & stages for m in stages if graph[m] & stages} == {}


def test_every_dpoflow_import_names_a_module_or_a_name_in_the_tree(repo):
    files = modules(repo)
    unresolved = []
    for module, file in files.items():
        package = module if file.name == "__init__.py" else module.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                unresolved += [f"{module}: import {a.name}" for a in node.names
                               if a.name.split(".")[0] == "dpoflow" and a.name not in files]
            elif isinstance(node, ast.ImportFrom):
                target = (".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                   + ([node.module] if node.module else [])) if node.level else node.module or "")
                if target.split(".")[0] == "dpoflow" and target not in files:
                    unresolved.append(f"{module}: from {target} import ...")
    assert unresolved == []
    # No remapping of folders to package names that a reader of the tree would have to know about.
    assert "package-dir" not in (repo / "pyproject.toml").read_text()
    assert {"dpoflow.flows.pipeline", "dpoflow.tasks.dpo"} <= set(files)


@pytest.mark.slow
def test_the_built_wheel_holds_every_layer_and_the_linked_flows_and_tasks(repo, tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(repo)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("dpoflow-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {file.relative_to(repo).as_posix() for module, file in modules(repo).items()
                if not module.startswith("dpoflow.evals.")}  # evals/ ships its data, not its generator
    expected |= {"dpoflow/builtin/tiny_corpus.txt"}
    assert expected - names == set()
    assert any(n.startswith("dpoflow/evals/") and n.endswith(".jsonl") for n in names)


def test_the_checks_find_a_cycle_and_an_upward_import(tmp_path):
    for folder in ("dpoflow", "dpoflow/engine", "dpoflow/base", "flows", "tasks"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("")
    for linked in ("flows", "tasks"):
        (tmp_path / "dpoflow" / linked).symlink_to(Path("..") / linked)
    (tmp_path / "dpoflow" / "engine" / "training.py").write_text("def f():\n    from .distributed import world_size\n")
    (tmp_path / "dpoflow" / "engine" / "distributed.py").write_text("from dpoflow.engine import training\n")
    (tmp_path / "dpoflow" / "base" / "config.py").write_text("from dpoflow.engine.training import f\n")
    (tmp_path / "tasks" / "dpo.py").write_text("from . import stage_task\nfrom dpoflow.flows.pipeline import x\n")
    (tmp_path / "flows" / "pipeline.py").write_text("import dpoflow.tasks.dpo\n")
    graph = import_graph(tmp_path)
    assert graph["dpoflow.engine.distributed"] == {"dpoflow.engine.training"}
    assert graph["dpoflow.tasks.dpo"] == {"dpoflow.tasks", "dpoflow.flows.pipeline"}
    assert sorted(cycles(graph)) == [["dpoflow.engine.training", "dpoflow.engine.distributed", "dpoflow.engine.training"],
                                     ["dpoflow.flows.pipeline", "dpoflow.tasks.dpo", "dpoflow.flows.pipeline"]]
    assert upward_imports(graph) == ["dpoflow.base.config (base) imports dpoflow.engine.training (engine)",
                                     "dpoflow.tasks.dpo (tasks) imports dpoflow.flows.pipeline (flows)"]
