"""The package layout ARCHITECTURE.md describes: the folders it names exist with the modules
it names, module-level imports form no cycle, and nothing the node runs imports the training
package (``dcn_train``) at import time."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "dcn_node"


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(path: Path, modules: set[str]) -> set[str]:
    """dcn_node/dcn_train modules imported at module level (not inside functions and not
    under ``if TYPE_CHECKING``); ``from package import module`` counts as the module."""
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        for item in ast.walk(node) if isinstance(node, (ast.If, ast.Try)) else [node]:
            if isinstance(item, ast.Import):
                found |= {a.name for a in item.names}
            elif isinstance(item, ast.ImportFrom) and item.module and item.level == 0:
                submodules = {f"{item.module}.{a.name}" for a in item.names} & modules
                found |= submodules
                if len(submodules) < len(item.names):
                    found.add(item.module)
    return {name for name in found if name.split(".")[0] in ("dcn_node", "dcn_train")}


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for root in (PACKAGE, ROOT / "dcn_train")
            for p in root.rglob("*.py")}


def graph() -> dict[str, set[str]]:
    modules = {k: v for k, v in all_modules().items() if k.startswith("dcn_node")}
    return {name: {m for m in module_level_imports(path, set(modules))
                   if m in modules and m != name}
            for name, path in modules.items()}


def test_the_import_graph_has_no_cycles() -> None:
    edges = graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(edges[node]):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for name in sorted(edges):
        if name not in state:
            visit(name)


def test_the_runtime_never_imports_training() -> None:
    modules = set(all_modules())
    for path in PACKAGE.rglob("*.py"):
        assert not any(m.startswith("dcn_train")
                       for m in module_level_imports(path, modules)), path
    # And in a fresh interpreter, the node and its CLI load without it.
    code = ("import sys, dcn_node.node, dcn_node.cli, dcn_node.inference.engine, "
            "dcn_node.results; print(sorted(m for m in sys.modules if m.startswith('dcn_train')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "[]"


def test_the_tree_matches_architecture_md() -> None:
    text = (ROOT / "ARCHITECTURE.md").read_text()
    tree = text.split("```")[3]  # the second block: the tree
    # Entries start at column 2 ("  net/ ..."); their text runs to the next entry.
    entries = dict(re.findall(r"^  (\S+)(.*?)(?=^  \S|^\S|\Z)", tree, re.M | re.S))
    for folder in ("net", "store", "pipeline", "inference", "results", "ops"):
        assert f"{folder}/" in entries, folder
        named = set(re.findall(r"([a-z_]+)\.py", entries[f"{folder}/"]))
        present = {p.stem for p in (PACKAGE / folder).glob("*.py")} - {"__init__"}
        assert named and named <= present, (folder, named - present)
        assert present <= named, (folder, "not in ARCHITECTURE.md", present - named)
    root_modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__", "__main__"}
    described = {m for m in re.findall(r"([a-z_]+)\.py", " ".join(
        k + v for k, v in entries.items() if not k.endswith("/")))}
    assert root_modules == described
    assert (ROOT / "dcn_train" / "__init__.py").exists()


def test_no_module_is_much_over_600_lines() -> None:
    long = {module_name(p): n for p in [*PACKAGE.rglob("*.py"), *(ROOT / "dcn_train").rglob(
        "*.py")] if (n := len(p.read_text().splitlines())) > 650}
    assert not long, long
