"""The platform rooms (earlyfw.linux, earlyfw.windows, earlyfw.macos) build on
the shared core and on themselves only: no room imports another, directly or
through a shared module it imports, lazily inside a function included. What
two platforms share (the WireGuard handshake verdict) belongs in the core.
"""

from __future__ import annotations

import ast
from pathlib import Path

import earlyfw

PACKAGE = Path(earlyfw.__file__).parent
ROOMS = ("linux", "windows", "macos")


def module_name(path: Path) -> str:
    parts = ("earlyfw", *path.relative_to(PACKAGE).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every earlyfw name `path` imports: modules, and for `from M import x`
    also M.x (which is a module where x is one)."""
    names: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return {name for name in names if name == "earlyfw" or name.startswith("earlyfw.")}


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node but those under `if TYPE_CHECKING:`, which only mypy reads
    (earlyfw.system names every room there so mypy checks each implements the seam)."""
    nodes: list[ast.AST] = []
    todo = [tree]
    while todo:
        node = todo.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING":
            todo.extend(node.orelse)
            continue
        todo.extend(ast.iter_child_nodes(node))
    return nodes


def room(name: str) -> str | None:
    parts = name.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in ROOMS else None


def import_graph() -> dict[str, set[str]]:
    graph = {module_name(path): imported(path) for path in PACKAGE.rglob("*.py")}
    # Only what is a module of the package is followed.
    return {name: {i for i in imports if i in graph} for name, imports in graph.items()}


def reachable(graph: dict[str, set[str]], start: str) -> dict[str, str]:
    """Each module `start` imports, directly or not, with the module it was first reached from."""
    via: dict[str, str] = {}
    todo = [start]
    while todo:
        current = todo.pop()
        for name in sorted(graph[current]):
            if name not in via and name != start:
                via[name] = current
                todo.append(name)
    return via


def test_each_room_imports_only_the_shared_core_and_itself() -> None:
    graph = import_graph()
    assert {room(name) for name in graph} >= {*ROOMS, None}, "the rooms moved: this test reads nothing"
    crossings = []
    for name in sorted(graph):
        own = room(name)
        if own is None:
            continue
        for target, source in reachable(graph, name).items():
            if room(target) not in (None, own):
                crossings.append(f"{name} reaches {target} (imported by {source})")
    assert not crossings, "; ".join(crossings)


def test_the_handshake_core_is_shared_by_both_watchers() -> None:
    graph = import_graph()
    assert "earlyfw.handshake" in graph["earlyfw.linux.watcher.tunnels"]
    assert "earlyfw.handshake" in graph["earlyfw.windows.watcher"]
    assert all(room(name) is None for name in reachable(graph, "earlyfw.handshake"))
