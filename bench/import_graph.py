"""The package's import graph, read from the source with ``ast`` (nothing is imported).

Module names follow the installed layout: ``kernels/`` is ``layerzero_serve.kernels`` and
``scheduler/`` is ``layerzero_serve.scheduler`` (pyproject's package-dir remap). Used by
``tests/unit/test_import_graph.py`` (the layering rules) and ``bench/code_metrics.py``.

Rules (ARCHITECTURE.md, "Who owns what"):
- private: a module whose dotted name has a ``_name`` part is private to the package that holds
  it; only modules inside that package (its subpackages included, as in Python's convention)
  import it. So ``layerzero_serve._envs`` serves the whole runtime, while
  ``layerzero_serve.kv_cache._storage`` serves ``layerzero_serve.kv_cache`` only.
- upward: ``layerzero_serve.kernels`` imports nothing of the runtime but ``errors``;
  ``layerzero_serve.scheduler`` imports only the shared types, errors and the KV protocol;
  ``errors``, ``request`` and ``types`` are leaves.

Imports under ``if TYPE_CHECKING:`` are annotations only (never executed) and are skipped.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tomllib

TOP = "layerzero_serve"
KERNELS = f"{TOP}.kernels"
SCHEDULER = f"{TOP}.scheduler"
LEAVES = {
    f"{TOP}.errors": set(),
    f"{TOP}.request": {f"{TOP}.errors"},
    f"{TOP}.types": {f"{TOP}.errors", f"{TOP}.request"},
}
KERNELS_MAY_IMPORT = {f"{TOP}.errors"}
SCHEDULER_MAY_IMPORT = {f"{TOP}.errors", f"{TOP}.types", f"{TOP}.kv_cache.protocol"}


@dataclass(frozen=True, slots=True)
class Edge:
    importer: str  # dotted module name
    imported: str  # dotted module name (a submodule when ``from pkg import sub`` names one)
    where: str  # "path:line"


def package_dirs(root: Path) -> dict[str, Path]:
    cfg = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    return {pkg: root / d for pkg, d in cfg["package-dir"].items()}


def iter_modules(root: Path) -> Iterator[tuple[str, Path]]:
    """(dotted name, path) of every module; ``pkg/__init__.py`` is named ``pkg``. Each
    package-dir folder is walked once under its installed name (the folders do not nest)."""
    for pkg, folder in sorted(package_dirs(root).items()):
        if pkg != TOP and folder.parent == root / TOP:
            continue  # a subpackage at its usual place: walked with layerzero_serve/
        for path in sorted(folder.rglob("*.py")):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            yield ".".join([pkg, *parts]), path


def _is_package(name: str, modules: dict[str, Path]) -> bool:
    return modules[name].name == "__init__.py"


def module_imports(root: Path) -> list[Edge]:
    """Every import of a module of this tree, lazy and TYPE_CHECKING ones included."""
    modules = dict(iter_modules(root))
    edges = []
    for name, path in modules.items():
        pkg = name if _is_package(name, modules) else name.rpartition(".")[0]
        tree = ast.parse(path.read_text())
        rel = path.relative_to(root)
        skip = {id(n) for n in _type_checking_nodes(tree)}
        for node in ast.walk(tree):
            if id(node) in skip:
                continue
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
                targets = subs or [base]
            for t in targets:
                while t and t not in modules:  # `import a.b.c` of a name inside a module
                    t = t.rpartition(".")[0]
                if t and t.startswith(TOP):
                    edges.append(Edge(name, t, f"{rel}:{node.lineno}"))
    return edges


def _type_checking_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node inside an ``if TYPE_CHECKING:`` block."""
    out = []
    for node in ast.walk(tree):
        test = getattr(node, "test", None)
        if isinstance(node, ast.If) and (
            (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
            or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
        ):
            for child in node.body:
                out.extend(ast.walk(child))
    return out


def _private_owner(imported: str) -> str | None:
    """The package a private module belongs to: the prefix before its first ``_name`` part."""
    parts = imported.split(".")
    for i, p in enumerate(parts):
        if p.startswith("_") and not p.startswith("__"):
            return ".".join(parts[:i])
    return None


def _component(name: str) -> str:
    """``layerzero_serve.<sub>`` for a module of a subpackage, else the module itself."""
    parts = name.split(".")
    return ".".join(parts[:2]) if len(parts) > 1 else name


def violations(edges: list[Edge]) -> dict[str, list[str]]:
    """``private``: imports of another package's ``_module``; ``upward``: layering breaks;
    ``cross_package``: the number of imports between different packages (for context)."""
    private, upward = [], []
    cross = 0
    for e in edges:
        imp_pkg = e.importer.rpartition(".")[0] if e.importer != TOP else TOP
        owner = _private_owner(e.imported)
        if _component(e.importer) != _component(e.imported):
            cross += 1
        if owner is not None and not (
            e.importer == owner or e.importer.startswith(owner + ".") or imp_pkg == owner
        ):
            private.append(f"{e.where}: {e.importer} -> {e.imported}")
        rule = None
        if e.importer.startswith(KERNELS) and not e.imported.startswith(KERNELS):
            rule = KERNELS_MAY_IMPORT
        elif e.importer.startswith(SCHEDULER) and not e.imported.startswith(SCHEDULER):
            rule = SCHEDULER_MAY_IMPORT
        elif e.importer in LEAVES:
            rule = LEAVES[e.importer]
        if rule is not None and e.imported not in rule:
            upward.append(f"{e.where}: {e.importer} -> {e.imported}")
    return {"private": private, "upward": upward, "cross_package": [str(cross)]}
