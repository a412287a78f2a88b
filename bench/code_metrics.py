"""Structure metrics of the source tree (for the redesign's before/after note).

    python bench/code_metrics.py [--root DIR] [--out DIR]

Reports: the largest file and function (lines), imports of another package's private
(``_name``) module, upward imports (``kernels`` beyond ``errors``; ``scheduler`` beyond the
shared types, errors and the KV protocol), and, per ``Request`` field, the places in the code
that write an attribute of that name (assignment, augmented assignment, item/slice assignment,
``del``, or a mutating method call such as ``.append``). The last is by attribute name, so a
same-named attribute of another class counts too; it is an upper bound.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import write_result  # noqa: E402
from import_graph import iter_modules, module_imports, violations  # noqa: E402

MUTATORS = {"append", "extend", "clear", "pop", "insert", "remove", "add", "update", "discard"}


def _request_fields(root: Path) -> list[str]:
    """The per-request fields: ``Request``'s annotated fields in ``types.py`` (before the
    redesign), or ``RequestDescription``'s fields plus ``Request.__slots__`` in ``request.py``."""
    fields: list[str] = []
    for rel in ("layerzero_serve/types.py", "layerzero_serve/request.py"):
        path = root / rel
        if not path.exists():
            continue
        for node in ast.parse(path.read_text()).body:
            if not isinstance(node, ast.ClassDef):
                continue
            if node.name in ("Request", "RequestDescription"):
                for n in node.body:
                    if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name):
                        fields.append(n.target.id)
                    elif (
                        isinstance(n, ast.Assign)
                        and any(isinstance(t, ast.Name) and t.id == "__slots__" for t in n.targets)
                        and isinstance(n.value, ast.Tuple)
                    ):
                        fields.extend(e.value for e in n.value.elts if isinstance(e, ast.Constant))
    return [f for f in dict.fromkeys(fields) if f != "desc"]


def _written_attr(node: ast.AST) -> str | None:
    """The attribute name a target writes: ``x.f = ``, ``x.f[i] = ``, ``x.f[a:b] = ``."""
    while isinstance(node, ast.Subscript):
        node = node.value
    return node.attr if isinstance(node, ast.Attribute) else None


def field_writers(root: Path) -> dict[str, list[str]]:
    fields = set(_request_fields(root))
    places: dict[str, set[str]] = defaultdict(set)
    for _name, path in iter_modules(root):
        tree = ast.parse(path.read_text())
        rel = str(path.relative_to(root))
        for node in ast.walk(tree):
            targets: list[ast.AST] = []
            if isinstance(node, ast.Assign):
                targets = node.targets
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
                targets = [node.target]
            elif isinstance(node, ast.Delete):
                targets = node.targets
            elif (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in MUTATORS
            ):
                targets = [node.func.value]
            for t in targets:
                for sub in t.elts if isinstance(t, ast.Tuple) else [t]:
                    attr = _written_attr(sub)
                    if attr in fields and not rel.endswith(("types.py", "request.py")):
                        places[attr].add(f"{rel}:{node.lineno}")
    return {f: sorted(places.get(f, ())) for f in sorted(fields)}


def size_metrics(root: Path) -> dict[str, object]:
    files, funcs = [], []
    for _name, path in iter_modules(root):
        text = path.read_text()
        rel = str(path.relative_to(root))
        files.append((len(text.splitlines()), rel))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                funcs.append((node.end_lineno - node.lineno + 1, f"{rel}:{node.name}"))
    files.sort(reverse=True)
    funcs.sort(reverse=True)
    return {
        "largest_files": files[:5],
        "largest_functions": funcs[:5],
        "num_files": len(files),
        "files_over_300_lines": sum(n > 300 for n, _ in files),
        "functions_over_60_lines": sum(n > 60 for n, _ in funcs),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=Path(__file__).resolve().parents[1])
    ap.add_argument("--out", type=Path, default=None, help="results folder (default bench/out)")
    ap.add_argument("--name", default="code_metrics")
    args = ap.parse_args(argv)
    root = args.root.resolve()
    bad = violations(module_imports(root))
    writers = field_writers(root)
    res = {
        "root": str(root),
        "sizes": size_metrics(root),
        "private_cross_package_imports": len(bad["private"]),
        "upward_imports": len(bad["upward"]),
        "violations": bad,
        "request_field_writers": {f: len(p) for f, p in writers.items()},
        "request_field_writer_places": writers,
    }
    brief = {k: v for k, v in res.items() if "places" not in k and k != "violations"}
    print(json.dumps(brief, indent=1))
    print("wrote", write_result(args.name, res, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
