"""The package's layout: imports run one way through the layers of docs/architecture.md.

Every ``import`` inside collabsurgery is read from the source (module level and inside
functions alike, since a deferred import is still a dependency), and the test fails on

- an import cycle between modules, and
- an import from a layer above the importer's (or between two packages of the same layer).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "collabsurgery"

# Lowest first. A module may import its own package and the packages of lower layers.
LAYERS: list[tuple[str, ...]] = [
    ("errors",),
    ("common",),
    ("models",),
    ("surgery", "data"),
    ("graphs",),
    ("objectives",),
    ("config",),
    ("rundir",),
    ("export",),
    ("train",),
    ("measure", "detection"),
    ("studies",),
    ("cli", "__init__"),
]
RANK = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}


def imports_of(name: str) -> set[str]:
    """The collabsurgery modules ``name`` imports (``from pkg import mod`` resolves to mod)."""
    path = MODULES[name]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.add(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def package_of(name: str) -> str:
    parts = name.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def test_every_module_belongs_to_a_declared_layer():
    undeclared = sorted({package_of(m) for m in MODULES} - set(RANK))
    assert not undeclared, f"add these to LAYERS and docs/architecture.md: {undeclared}"


def test_top_level_holds_only_the_public_api_cli_and_errors():
    loose = sorted(p.name for p in PACKAGE.glob("*.py"))
    assert loose == ["__init__.py", "cli.py", "errors.py"]


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules, or None (iterative DFS, three colours)."""
    colour = dict.fromkeys(graph, 0)
    for root in sorted(graph):
        if colour[root]:
            continue
        stack, path = [(root, iter(sorted(graph[root])))], [root]
        colour[root] = 1
        while stack:
            node, children = stack[-1]
            child = next(children, None)
            if child is None:
                colour[node] = 2
                stack.pop()
                path.pop()
            elif colour[child] == 1:
                return path[path.index(child):] + [child]
            elif colour[child] == 0:
                colour[child] = 1
                stack.append((child, iter(sorted(graph[child]))))
                path.append(child)
    return None


def test_no_import_cycles():
    cycle = find_cycle(GRAPH)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_imports_follow_the_layers(name):
    own = package_of(name)
    against = sorted(m for m in GRAPH[name]
                     if package_of(m) != own and RANK[package_of(m)] >= RANK[own]
                     and not (own == "__init__" and package_of(m) != "cli"))
    assert not against, (f"{name} (layer {own}) imports {against}: a layer may import only "
                         "layers below it (see LAYERS and docs/architecture.md)")
