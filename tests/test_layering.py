"""The package's import structure: layers, no cycles, no use of another module's private names.

Imports are read from the source (``ast``), including imports inside functions; only blocks under
``if TYPE_CHECKING:`` are skipped. Every module must be listed in ``RANKS``: a module may import
modules of its own rank or lower, never higher, and the import graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = "laplace_kron"
ROOT = Path(__file__).resolve().parents[1] / PKG

# Low to high. A prefix ending in "." covers every module below it.
RANKS: dict[str, int] = {
    "constants": 0,
    "io": 1,
    "distributed": 1,
    "validation": 1,
    "spectrum": 1,
    "links": 1,
    "metrics": 1,
    "diagblock": 2,
    "kron": 2,
    "factors": 2,
    "kron_groups": 2,
    "kron_sum": 2,
    "block_state": 2,
    "output_noise": 2,
    "diagprior": 2,
    "curvature.": 3,  # the curvature package's modules
    "curvature": 4,  # its __init__
    "posterior": 5,
    "sampling": 6,
    "glm": 6,
    "glm_blocks": 6,
    "glm_diag": 6,
    "glm_joint": 6,
    "predictive": 6,
    "marglik": 6,
    "laplace": 7,
    "continual": 7,
    "online_precision": 7,
    "online_state": 7,
    "optim": 7,  # the preconditioners' package and its modules
    "optim.": 7,
    "training": 8,
    "datasets": 8,
    "plots": 8,
    "demo": 8,
    "demo.": 8,
    "cli": 8,
    "__main__": 8,
    "": 8,  # the package's __init__
}


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _rank(mod: str) -> int:
    if mod in RANKS:
        return RANKS[mod]
    prefixes = [p for p in RANKS if p.endswith(".") and mod.startswith(p)]
    if not prefixes:
        pytest.fail(f"laplace_kron.{mod} has no layer: add it to RANKS in {__file__}")
    return RANKS[max(prefixes, key=len)]


def _is_package(mod: str) -> bool:
    return MODULES[mod].name == "__init__.py"


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                skip.update(id(n) for n in ast.walk(child))
    return skip


def _resolve(mod: str, node: ast.ImportFrom) -> str | None:
    """The package-relative module an ``ImportFrom`` reads from (None: outside the package)."""
    if node.level == 0:
        if node.module is None or not (node.module == PKG or node.module.startswith(PKG + ".")):
            return None
        return node.module[len(PKG) + 1 :]
    base = mod.split(".") if mod else []
    if not _is_package(mod):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    if node.module:
        base += node.module.split(".")
    return ".".join(base)


def _imports(mod: str) -> list[tuple[str, list[str], int]]:
    """``(module, imported names, line)`` for each intra-package import of ``mod``."""
    tree = ast.parse(MODULES[mod].read_text())
    skip = _type_checking_nodes(tree)
    out = []
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PKG or alias.name.startswith(PKG + "."):
                    out.append((alias.name[len(PKG) + 1 :], [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            target = _resolve(mod, node)
            if target is None:
                continue
            names = [a.name for a in node.names]
            # ``from pkg import submodule`` depends on the submodule, not on the package.
            subs = [f"{target}.{n}".lstrip(".") for n in names]
            if all(s in MODULES for s in subs):
                out.extend((s, [], node.lineno) for s in subs)
            else:
                out.append((target, names, node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    return {m: {t for t, _, _ in _imports(m) if t != m} for m in MODULES}


def test_every_module_has_a_layer():
    for mod in MODULES:
        _rank(mod)


def test_no_import_of_a_higher_layer():
    bad = [
        f"laplace_kron.{m}:{line} imports laplace_kron.{t} (layer {_rank(t)} > {_rank(m)})"
        for m in MODULES
        for t, _, line in _imports(m)
        if t in MODULES and _rank(t) > _rank(m)
    ]
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if t not in MODULES:
                continue
            if state.get(t) == 1:
                cycle = stack[stack.index(t) :] + [t]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(MODULES):
        if m not in state:
            visit(m)


def _defined_private_names(tree: ast.AST) -> set[str]:
    """Underscore names a module defines itself: functions, classes, assignments, attributes it
    assigns (``self._x = ...``), dataclass fields and arguments."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.arg):
            names.add(node.arg)
    return {n for n in names if n.startswith("_")}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_use_of_another_modules_private_names():
    bad = []
    for mod, path in MODULES.items():
        tree = ast.parse(path.read_text())
        own = _defined_private_names(tree)
        for t, names, line in _imports(mod):
            bad += [f"{mod}:{line} imports {t}.{n}" for n in names if _private(n)]
        for node in ast.walk(tree):
            if not isinstance(node, ast.Attribute) or not _private(node.attr):
                continue
            owner = ast.unparse(node.value)
            if owner in ("self", "cls") or node.attr in own:
                continue
            bad.append(f"{mod}:{node.lineno} uses {owner}.{node.attr}")
    assert not bad, "private names of other modules (or libraries) used:\n" + "\n".join(bad)
