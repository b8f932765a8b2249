"""The package's layering (shared/LAYOUT.md): no import circles, no import from a lower layer up.

Layers, lowest first: errors, config -> data, models, kernels -> adapters -> fast_path -> training ->
eval -> deploy -> recipes -> api -> cli. A module may import its own layer or lower ones; kernels import
nothing from deftune but errors. Every import statement counts: top level, inside functions and under
``if TYPE_CHECKING``. There is no allow-list.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "deftune"

# The first component under the package decides the layer; the package itself sits with api.
LAYERS = {
    "errors": 0, "config": 0,
    "data": 1, "models": 1, "kernels": 1, "assets": 1,
    "adapters": 2,
    "fast_path": 3,
    "training": 4,
    "eval": 5,
    "deploy": 6,
    "recipes": 7,
    "api": 8,
    "": 8,  # deftune/__init__.py re-exports the API
    "cli": 9, "__main__": 9,
}
# kernels are a leaf: only these deftune modules may be imported from them (besides kernels itself).
KERNEL_DEPENDENCIES = ("errors",)


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under the package folder ``root``."""
    found = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        found[".".join(parts)] = path
    return found


def import_edges(root: Path) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (any import statement anywhere in the file)."""
    modules = module_files(root)
    package = root.name

    def resolve(name: str) -> str:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name

    edges: dict[str, set[str]] = {}
    for module, path in modules.items():
        is_package = path.name == "__init__.py"
        targets: list[str] = []
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets += [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = module.split(".") if is_package else module.split(".")[:-1]
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from a import b` may name the submodule a.b or an attribute of a: resolve() decides.
                targets += [f"{source}.{alias.name}" for alias in node.names]
        for target in targets:
            if target.split(".")[0] != package:
                continue
            resolved = resolve(target)
            if resolved and resolved != module:
                edges.setdefault(module, set()).add(resolved)
    return edges


def find_cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
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
                cycles.append(sorted(component))

    for v in sorted(set(edges) | {w for ws in edges.values() for w in ws}):
        if v not in index:
            visit(v)
    return cycles


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def upward_imports(edges: dict[str, set[str]], layers: dict[str, int] = LAYERS) -> list[str]:
    """``"a -> b"`` for each import of a higher layer (or, from kernels, of anything but errors)."""
    found = []
    for module, targets in sorted(edges.items()):
        own = _component(module)
        for target in sorted(targets):
            theirs = _component(target)
            if own not in layers or theirs not in layers:
                found.append(f"{module} -> {target} (no layer for {own if own not in layers else theirs!r})")
            elif layers[theirs] > layers[own]:
                found.append(f"{module} -> {target}")
            elif own == "kernels" and theirs not in ("kernels", *KERNEL_DEPENDENCIES):
                found.append(f"{module} -> {target} (kernels import only errors)")
    return found


def test_no_import_cycles():
    cycles = find_cycles(import_edges(SRC))
    assert not cycles, "import circles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_no_upward_imports():
    upward = upward_imports(import_edges(SRC))
    assert not upward, "imports from a lower layer up:\n" + "\n".join(upward)


@pytest.fixture
def planted(tmp_path: Path) -> Path:
    """A small package with a circle (a <-> b, one side inside a function) and an upward import."""
    root = tmp_path / "pkg"
    (root / "kernels").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "kernels" / "__init__.py").write_text("")
    (root / "kernels" / "a.py").write_text("from pkg.kernels import b\n")
    (root / "kernels" / "b.py").write_text("def f():\n    from pkg.kernels.a import x\n")
    (root / "kernels" / "c.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
                                           "    from pkg.training import loop\n")
    (root / "training").mkdir()
    (root / "training" / "__init__.py").write_text("")
    (root / "training" / "loop.py").write_text("from . import helper\n")
    (root / "training" / "helper.py").write_text("from ..kernels import a\n")
    return root


def test_checks_can_fail(planted: Path):
    edges = import_edges(planted)
    assert find_cycles(edges) == [["pkg.kernels.a", "pkg.kernels.b"]]
    upward = upward_imports(edges)
    assert upward == ["pkg.kernels.c -> pkg.training.loop"]
    # Relative imports resolve: training.helper -> kernels.a is downward, training.loop -> helper is level.
    assert edges["pkg.training.loop"] == {"pkg.training.helper"}
    assert edges["pkg.training.helper"] == {"pkg.kernels.a"}
