"""Imports go one way (the README's map of the code): exporters -> core <- runtime, tools on top, the testbed
above all. Walks the AST of every module (lazy imports inside functions count; `if TYPE_CHECKING:` blocks do
not, they never run) and fails on a forbidden import or a cycle between layers or modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Source folder -> the package name it is installed as (pyproject's package-dir).
PACKAGES = {"edgeexit": "edgeexit", "exporters": "edgeexit.exporters", "runtime": "edgeexit.runtime"}
# The package root is a front door (`edgeexit.export` hands over to the exporter, lazily): it sits with the tools.
# So does the apps' client (edgeexit.client): it speaks the runtime's wire, and nothing in core or runtime uses it.
TOOLS = {"edgeexit.evaluation", "edgeexit.plan_report", "edgeexit", "edgeexit.client"}
# Each layer may import only the layers listed (and itself).
ALLOWED = {
    "core": {"core"},
    "runtime": {"core"},
    "exporters": {"core", "runtime"},  # the exporter round-trips every segment through the runtime it ships to
    "tools": {"core", "runtime", "exporters"},
    "cli": {"core", "runtime", "exporters", "tools", "testbed"},
    "testbed": {"core", "runtime", "exporters", "tools", "cli"},
}


def layer(module: str) -> str:
    for prefix, name in (("edgeexit.testbed", "testbed"), ("edgeexit.cli", "cli"), ("edgeexit.runtime", "runtime"),
                         ("edgeexit.exporters", "exporters"), ("edgeexit.devices", "core")):
        if module == prefix or module.startswith(prefix + "."):
            return name
    if module in TOOLS or module == "edgeexit.__main__":
        return "tools" if module in TOOLS else "cli"
    return "core"


def module_files() -> dict[str, Path]:
    out = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            if folder == "edgeexit" and parts and parts[0] in ("exporters", "runtime"):
                continue
            out[".".join([package, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """First-party modules that `module` imports at run time (absolute and relative)."""
    found: set[str] = set()
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                found.update(a.name for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                found.add(base)
                found.update(f"{base}.{a.name}" for a in child.names)
            visit(child)

    visit(ast.parse(path.read_text(), str(path)))
    return {m for m in found if m in known and m != module}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    files = module_files()
    return {m: imports_of(m, p, set(files)) for m, p in files.items()}


def test_every_import_follows_the_layers(graph):
    bad = [f"{m} ({layer(m)}) imports {d} ({layer(d)})" for m, deps in graph.items() for d in sorted(deps)
           if layer(d) != layer(m) and layer(d) not in ALLOWED[layer(m)] and d != "edgeexit"]
    assert not bad, "imports against the README's map:\n" + "\n".join(bad)


def test_the_product_never_imports_the_testbed(graph):
    product = [m for m in graph if layer(m) in ("core", "runtime", "exporters", "tools")]
    bad = [f"{m} imports {d}" for m in product for d in graph[m] if layer(d) == "testbed"]
    assert not bad, bad
    assert any(layer(m) == "testbed" for m in graph), "the walk found no testbed module: is the map stale?"


def test_no_import_cycles_between_product_modules(graph):
    product = {m: {d for d in deps if layer(d) != "cli" and d != "edgeexit"} for m, deps in graph.items()
               if layer(m) not in ("cli", "testbed") and m != "edgeexit"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for d in sorted(product.get(m, ())):
            if d.startswith(m + ".") or m.startswith(d + "."):
                continue  # a package and its own submodules (lazy re-exports) are one unit
            if state.get(d) == 1:
                return stack[stack.index(d):] + [d]
            if d not in state and (cycle := dfs(d)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(product):
        if m not in state and (cycle := dfs(m)):
            pytest.fail("import cycle: " + " -> ".join(cycle))


def test_the_checker_sees_a_forbidden_import(tmp_path):
    # The walk must catch lazy imports inside functions and relative imports, and skip TYPE_CHECKING blocks.
    src = tmp_path / "mod.py"
    src.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from edgeexit.testbed import harness\n"
                   "def f():\n    from edgeexit.testbed.netsim import relay\n    from . import planner\n")
    known = {"edgeexit.testbed.harness", "edgeexit.testbed.netsim.relay", "edgeexit.testbed.netsim",
             "edgeexit.planner"}
    assert imports_of("edgeexit.fake", src, known) == {"edgeexit.testbed.netsim.relay", "edgeexit.testbed.netsim",
                                                       "edgeexit.planner"}
    assert layer("edgeexit.testbed.netsim.relay") == "testbed" and "testbed" not in ALLOWED["runtime"]
