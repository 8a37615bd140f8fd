"""The layers of docs/architecture.md, read from the code: every import (those inside functions too)
runs down a layer or along the data path, and no modules import each other in a circle."""

from __future__ import annotations

import ast
from pathlib import Path

from kota.settings import PROJECT_ROOT

STAGES = {"simulators", "ingest", "processing", "ops_api", "notifier", "commander"}
# What each top-level package may import besides itself: cli → deploy → stages → kota. A stage
# reads only upstream on the data path: the API reads what processing owns (its rules), nothing else.
MAY_IMPORT: dict[str, set[str]] = {
    "kota": set(),
    "simulators": {"kota"},
    "ingest": {"kota"},
    "processing": {"kota"},
    "ops_api": {"kota", "processing"},
    "notifier": {"kota", "processing"},
    "commander": {"kota"},
    "deploy": {"kota"},
    "cli": {"kota", "deploy", *STAGES},
    "bench": {"kota", "deploy", *STAGES},
}


def project_modules() -> dict[str, Path]:
    """Every module of the packages above, by dotted name."""
    modules = {}
    for package in MAY_IMPORT:
        for path in sorted((PROJECT_ROOT / package).rglob("*.py")):
            parts = path.relative_to(PROJECT_ROOT).with_suffix("").parts
            modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules `name` imports anywhere in its file (`from a import b` names a.b when it is one)."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a package's attribute
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def test_every_import_runs_down_a_layer_or_along_the_data_path():
    upward = []
    for name, targets in import_graph().items():
        home = name.split(".")[0]
        upward += [
            f"{name} imports {target}"
            for target in sorted(targets)
            if target.split(".")[0] not in {home, *MAY_IMPORT[home]}
        ]
    assert not upward, "\n".join(upward)


def test_no_modules_import_each_other_in_a_circle():
    graph = import_graph()
    # Tarjan's strongly connected components: any with two modules or more is a circle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    circles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not circles, "\n".join(" <-> ".join(circle) for circle in circles)


def test_the_import_reader_sees_imports_inside_functions():
    graph = import_graph()
    assert "deploy.mqtt_access" in graph["cli.registry"]  # imported inside cmd_devices
    assert "kota.contract" in graph["kota.registry"]


def test_the_readme_and_docs_name_every_package_and_module_of_the_layers():
    readme = (PROJECT_ROOT / "README.md").read_text()
    architecture = (PROJECT_ROOT / "docs" / "architecture.md").read_text()
    for package in MAY_IMPORT.keys() - {"bench"}:
        assert f"| `{package}/` |" in readme, f"README's folder table has no row for {package}/"
    for module in ("kota/process.py", "cli/main.py", "deploy/components.py", "processing/settings.py"):
        assert (PROJECT_ROOT / module).exists() and f"`{module}`" in architecture, module
