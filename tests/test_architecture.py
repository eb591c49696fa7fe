"""The package's layout: no import cycle, the one-way order of the packages, and no branch on a registered name.

The module graph is read from the source with ``ast``: every ``import`` / ``from ... import`` of a
``grft_vision`` module, at module level or inside functions (only those under ``if TYPE_CHECKING:`` are
left out), and the lazy exports of a package's ``__init__`` (``attach(__name__, {...})``). An import of
``a.b.c`` is an edge to ``a.b.c`` (not to the packages above it, whose ``__init__`` files the test reads as
modules of their own).
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "grft_vision"

# the layers of the package, bottom to top: a module may import only modules of its own layer or below
LAYERS = [
    {"errors", "version", "registry", "files", "extras", "_lazy"},
    {"tuner.dtypes", "tuner.fused", "tuner.batch_context", "tuner.structures", "selection.scores",
     "selection.losses"},
    {"config"},
    {"tuner"},
    {"selection"},
    {"api"},
    {"io", "data"},
    {"training"},
    {"integrations", "llm", "export", "commands", ""},
]


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST, module: str, is_package: bool) -> list[str]:
    """The absolute names of the grft_vision modules (or packages) a module's source imports."""
    package = module if is_package else module.rpartition(".")[0]
    found: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.extend(f"{target}.{alias.name}" for alias in node.names)  # "pkg.mod.Name" resolves to "pkg.mod"
        elif isinstance(node, ast.Call) and getattr(node.func, "id", None) == "attach" and len(node.args) == 2 \
                and isinstance(node.args[1], ast.Dict):
            found.extend(f"{module}.{key.value}" for key in node.args[1].keys if isinstance(key, ast.Constant))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def module_graph() -> dict[str, set[str]]:
    """``{module: {modules it imports}}`` over the grft_vision package."""
    sources = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for module, path in sources.items():
        targets = set()
        for name in _imports(ast.parse(path.read_text(encoding="utf-8")), module, path.name == "__init__.py"):
            while name and name not in sources:  # "pkg.mod.Name" -> "pkg.mod"
                name = name.rpartition(".")[0]
            if name and name != module and name.startswith("grft_vision"):
                targets.add(name)
        graph[module] = targets
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (as a path) per strongly connected component with more than one module (Tarjan)."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph[node]):
            if target not in index:
                connect(target)
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
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    cycles = []
    for component in components:  # a path through the component back to its start
        members, start = set(component), min(component)
        path, seen = [start], {start}
        while True:
            following = sorted(graph[path[-1]] & members)
            back = start in following
            unseen = [target for target in following if target not in seen]
            if back and (len(path) > 1 or not unseen):
                break
            path.append(unseen[0])
            seen.add(unseen[0])
        cycles.append(path + [start])
    return cycles


def test_the_import_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []
    tree = ast.parse("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .x import y\n"
                     "def f():\n    from ..z import w\n")
    assert _imports(tree, "grft_vision.pkg.mod", False) == ["typing.TYPE_CHECKING", "grft_vision.z.w"]


def test_no_import_cycle_in_the_package():
    cycles = _cycles(module_graph())
    assert not cycles, "import cycles (imports inside functions count): " + "; ".join(" -> ".join(c) for c in cycles)


def _layer(module: str) -> int:
    name = module.removeprefix("grft_vision").lstrip(".")
    best = max((key for layer in LAYERS for key in layer if name == key or name.startswith(key + ".")
                or (key == "" and name == "")), key=len)
    return next(position for position, layer in enumerate(LAYERS) if best in layer)


def test_packages_import_one_way_only():
    """errors/registry -> structures/scores -> config -> tuner -> selection -> api -> io/data -> training -> the
    scripts' packages: no module imports one of a layer above its own (the tuner never imports selection)."""
    upward = [f"{module} -> {target}" for module, targets in module_graph().items() for target in targets
              if _layer(target) > _layer(module)]
    assert not upward, "imports against the layer order: " + "; ".join(sorted(upward))


# names of registered structures, scores and methods, which only their registries may branch on
_REGISTERED = ("row", "column", "sparse", "tap_column", "grft", "full", "head", "supcon", "cross_entropy", "fisher",
               "grasp", "synflow", "magnitude")  # ("random" is also a kind of base weights)
_BRANCH = re.compile(r"""(?:==|!=|\bin\b|\bnot in\b)\s*\(?["'](%s)["']""" % "|".join(_REGISTERED))


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_branch_on_a_registered_name_outside_the_registries(path):
    """Code asks the registries (structures, scores, selection losses, training methods); it does not compare
    against their names. The registering modules themselves define the names."""
    source = path.read_text(encoding="utf-8")
    branches = [line.strip() for line in source.splitlines() if _BRANCH.search(line) and "STRUCTURES" not in line]
    assert not branches, f"{path.relative_to(PACKAGE)} branches on registered names: {branches}"
