"""The package's import graph has no cycle (module-level and function-level imports alike),
and the lower layers look only down."""

from __future__ import annotations

import ast
from pathlib import Path

import mergebake

PACKAGE = Path(mergebake.__file__).parent


def _imports(path: Path) -> set[str]:
    """Sibling modules ``path`` imports anywhere in its body, functions included
    (``from . import x``, ``from .x import y``, ``import mergebake.x``,
    ``from mergebake import x``, ``from mergebake.x import y``)."""
    modules = {p.stem for p in PACKAGE.glob("*.py")} - {"__init__"}
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            names = [node.module] if node.module else [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "mergebake":
                names = [a.name for a in node.names]
            elif node.module.startswith("mergebake."):
                names = [node.module.split(".")[1]]
            else:
                continue
        elif isinstance(node, ast.Import):
            names = [a.name.split(".")[1] for a in node.names if a.name.startswith("mergebake.")]
        else:
            continue
        out |= {n.split(".")[0] for n in names}
    return (out & modules) - {path.stem}


def graph() -> dict[str, set[str]]:
    return {p.stem: _imports(p) for p in sorted(PACKAGE.glob("*.py")) if p.stem != "__init__"}


def _cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the stack, 2: done
    stack: list[str] = []

    def visit(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (found := visit(n)):
                return found
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(g):
        if m not in state and (found := visit(m)):
            return found
    return None


def test_the_parser_sees_every_kind_of_import():
    g = graph()
    assert "safetensors_io" in g["checkpoint"]  # module level, relative
    assert "stream" in g["bake"]  # inside a function
    assert {"lora", "safetensors_io"} <= g["stream"]
    assert "cli" in g["__main__"]


def test_the_cycle_finder_finds_one():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle():
    g = graph()
    assert _cycle(g) is None, f"import cycle: {' -> '.join(_cycle(g))}"


def test_lower_layers_look_only_down():
    g = graph()
    io = {"safetensors_io", "hub", "outputs"}
    for m in io:
        assert g[m] <= io, (m, g[m])
    assert g["lora"] <= io | {"checkpoint"}
    assert "bake" not in g["stream"]
