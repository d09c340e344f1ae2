"""The library's imports only go down its layers, with no cycle, as the architecture page states.

Read from the source with `ast`, so the check covers every module, imported by a test or not. Imports inside
functions count too (a lazy import is still a dependency); only `if TYPE_CHECKING:` blocks are left out.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import networkx as nx
import pytest

REPO = Path(__file__).resolve().parents[1]
# Top to bottom: a package imports only from the layers below its own, never from a peer in its layer.
LAYERS = [["cli"], ["train", "evaluation", "inference"], ["cluster", "tracking", "data", "models"], ["checkpoint"],
          ["config"], ["storage"], ["background"]]
RANK = {package: depth for depth, layer in enumerate(LAYERS) for package in layer}


def project_imports(path: Path) -> set[str]:
    """The `pipeline.*` modules `path` imports, outside `if TYPE_CHECKING:` blocks."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.module.startswith("pipeline"):
                found.add(child.module)
            elif isinstance(child, ast.Import):
                found.update(alias.name for alias in child.names if alias.name.startswith("pipeline"))
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): project_imports(path) for path in sorted((REPO / "pipeline").rglob("*.py"))}


def package_of(module: str) -> str:
    return module.split(".")[1] if module.count(".") else ""


def test_every_package_has_a_layer() -> None:
    packages = {package_of(module) for module in MODULES} - {""}
    assert packages == set(RANK), f"packages without a layer, or layers without a package: {packages ^ set(RANK)}"


def test_imports_only_go_down() -> None:
    upward = defaultdict(set)
    for module, imports in MODULES.items():
        source = package_of(module)
        for target in {package_of(name) for name in imports} - {source, ""}:
            if RANK[target] <= RANK[source]:
                upward[module].add(target)
    assert not upward, f"imports that go up or sideways: {dict(upward)}"


def test_nothing_imports_jobs() -> None:
    """jobs/ holds entry points only: the library and the tests reach everything through `pipeline`."""
    for path in [*(REPO / "pipeline").rglob("*.py"), *(REPO / "tests").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [alias.name for alias in node.names] if isinstance(node, ast.Import) else [])
            assert not any(name == "jobs" or name.startswith("jobs.") for name in names), path


def test_storage_knows_bytes_urls_and_retries_only() -> None:
    """No torch, no yaml and nothing of the project but the background worker in `pipeline.storage`."""
    for module, imports in MODULES.items():
        if package_of(module) == "storage":
            text = (REPO / (module.replace(".", "/") + ".py")).read_text() if not module.endswith("storage") else ""
            assert "import torch" not in text and "import yaml" not in text, module
            assert {package_of(name) for name in imports} <= {"storage", "background"}, (module, imports)


@pytest.mark.parametrize("level", ["package", "module"])
def test_no_import_cycle(level: str) -> None:
    """No cycle between packages, nor between modules (a package's `__init__` re-exporting its own modules aside:
    Python runs the `__init__` first, so a module importing its own package's public names is no cycle)."""
    graph = nx.DiGraph()
    for module, imports in MODULES.items():
        for name in imports:
            target = name if name in MODULES else name.rsplit(".", 1)[0]
            if level == "package":
                graph.add_edge(package_of(module), package_of(target))
            elif not module.startswith(target + "."):
                graph.add_edge(module, target)
    graph.remove_edges_from(nx.selfloop_edges(graph))
    if "" in graph:
        graph.remove_node("")
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"
