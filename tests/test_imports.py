"""The import structure DESIGN.md states: one direction between the top-level folders, no cycle
between sub-packages (imports inside functions count: a late import is still a dependency)."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("protocols", "parties", "optimizer", "deploy", "benchmarks")
# What each top-level folder may import besides itself (DESIGN.md: deploy -> parties -> protocols;
# the optimizer uses protocols and writes the artifact parties read; nothing imports benchmarks).
ALLOWED = {
    "protocols": set(),
    "parties": {"protocols"},
    "optimizer": {"protocols"},
    "deploy": {"parties", "protocols", "optimizer"},
    "benchmarks": {"deploy", "parties", "protocols", "optimizer"},
}


def _imported_modules(path: Path, package: list[str]) -> list[str]:
    """Every twinfer module `path` imports, as dotted names relative to the repository root."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)]
                if node.module:
                    found.append(".".join([*base, node.module]))
                else:
                    found.extend(".".join([*base, alias.name]) for alias in node.names)
            elif node.module:
                found.append(node.module)
        elif isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
    names = [name.removeprefix("twinfer.") for name in found]
    return [name for name in names if name.split(".")[0] in FOLDERS]


def _subpackage(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else parts[0]


def import_edges() -> dict[str, set[str]]:
    """Sub-package -> the sub-packages it imports (a top-level module is its own sub-package)."""
    edges: dict[str, set[str]] = defaultdict(set)
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            package = parts[:-1]
            source = _subpackage(".".join(parts if path.name != "__init__.py" else parts[:-1]))
            for target in _imported_modules(path, package):
                if _subpackage(target) != source:
                    edges[source].add(_subpackage(target))
    return edges


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one sub-package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_top_level_folders_import_one_way():
    wrong = sorted(
        f"{source} imports {target}"
        for source, targets in import_edges().items()
        for target in targets
        if target.split(".")[0] != source.split(".")[0] and target.split(".")[0] not in ALLOWED[source.split(".")[0]]
    )
    assert not wrong, wrong


def test_no_import_cycle_between_subpackages():
    assert not _cycles(import_edges())


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a.x": {"a.y"}, "a.y": {"a.z"}, "a.z": {"a.x"}, "a.w": {"a.x"}}) == [["a.x", "a.y", "a.z"]]


def _environ_writes(path: Path) -> list[str]:
    """`os.environ[KEY] = ...`, `os.environ.setdefault/update/pop(KEY...)` and `os.putenv` in one file, by key."""
    writes = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        target = None
        if isinstance(node, ast.Assign):
            for t in node.targets:
                if isinstance(t, ast.Subscript) and ast.unparse(t.value) == "os.environ":
                    target = ast.unparse(t.slice)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner, method = ast.unparse(node.func.value), node.func.attr
            if (owner == "os.environ" and method in ("setdefault", "update", "pop", "__setitem__")) or (owner == "os" and method == "putenv"):
                target = ast.unparse(node.args[0]) if node.args else "**"
        if target is not None:
            writes.append(target)
    return writes


def test_settings_do_not_travel_in_environment_variables():
    # A session's settings go down as a SessionSpec (parties/runtime/session_spec.py), a party's
    # placement as PartyConfig.node; Ray's own switches (RAY_*) are set before an embedded start.
    found = sorted(
        f"{path.relative_to(ROOT)}: {key}"
        for folder in ("protocols", "parties", "optimizer", "deploy")
        for path in (ROOT / folder).rglob("*.py")
        if path.parent != ROOT / "deploy" / "cli"
        for key in _environ_writes(path)
        if not key.strip("'\"").startswith("RAY_")
    )
    assert not found, found
