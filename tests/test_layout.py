"""The package layout: sub-packages named by the data flow, imports pointing one way.

The import graph is read from the source: every ``import``, at module level, inside a
function or under ``if TYPE_CHECKING:`` (an import for types only still ties the parts
together, so it must point down the layers too).
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "rope_leak"

# From the bottom up; a part may import only from parts listed before it.
LAYERS = [
    {"version", "heads", "display", "download_cache", "quantities"},
    {"backends"},
    {"corpus", "interventions"},
    {"engine"},
    {"fits"},
    {"inference"},
    {"output"},
    {"analyses"},
    {"run_config"},
    {"pipeline"},
    {"cli", "__init__"},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(tree: ast.AST):
    """Yield (module, [names]) of every import in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield node.module, [alias.name for alias in node.names]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, []


def _graph() -> tuple[nx.DiGraph, list[tuple[str, str, str]]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = nx.DiGraph()
    private = []
    for name, path in modules.items():
        graph.add_node(name)
        for target, names in _imports(ast.parse(path.read_text(), str(path))):
            if not target.startswith("rope_leak"):
                continue
            # `from rope_leak.x import y` may name a submodule y
            for candidate in [f"{target}.{n}" for n in names if f"{target}.{n}" in modules] or [target]:
                if candidate in modules and candidate != name:
                    graph.add_edge(name, candidate)
            if _part(name) != _part(target):
                private += [(name, target, n) for n in names if n.startswith("_") and n != "__version__"]
    return graph, private


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _layer(part: str) -> int:
    for level, parts in enumerate(LAYERS):
        if part in parts:
            return level
    raise AssertionError(f"rope_leak.{part} is not placed in LAYERS: add it where it belongs")


def test_type_checking_imports_are_read():
    """The graph holds an import made for types only (a planted one, on a copy of the tree)."""
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from rope_leak.analyses import x\n")
    assert ("rope_leak.analyses", ["x"]) in list(_imports(tree))


def test_no_import_cycles():
    graph, _ = _graph()
    cycles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not cycles, f"import cycles: {cycles}"


def test_parts_import_only_downward():
    graph, _ = _graph()
    upward = [(a, b) for a, b in graph.edges if _layer(_part(b)) > _layer(_part(a))]
    assert not upward, f"imports that point up the layers: {upward}"


def test_no_private_names_across_parts():
    _, private = _graph()
    assert not private, f"private names imported across sub-packages: {private}"


def test_every_part_says_what_it_owns():
    for path in PACKAGE.rglob("*.py"):
        tree = ast.parse(path.read_text())
        assert ast.get_docstring(tree), f"{path.relative_to(ROOT)} has no opening docstring"


def test_readme_layout_matches_the_tree():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("## Layout", 1)[1].split("```", 2)[1]
    listed = set(re.findall(r"^\s{2}([a-z_]+)(?:/|\.py)", block, re.M))
    parts = {p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    parts |= {p.stem for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert listed == parts, f"README layout lists {sorted(listed - parts)} not in the tree, " \
                            f"misses {sorted(parts - listed)}"


def test_import_leaves_the_import_system_alone():
    """``import rope_leak`` installs no finder and aliases no module path (its dependencies
    are imported first: transformers installs a finder of its own)."""
    code = ("import sys, transformer_lens, transformers, scipy.stats, pandas, plotly; "
            "before = list(sys.meta_path); import rope_leak; "
            "assert sys.meta_path == before, sys.meta_path; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "ok"
