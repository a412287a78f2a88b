"""Test-session guard: the repository root must not be on ``sys.path``.

The repository's top-level ``kernels/`` and ``scheduler/`` folders install as
``layerzero_serve.kernels`` / ``layerzero_serve.scheduler``; seen from the root they would shadow
PyPI packages of the same name (transformers imports Hugging Face's ``kernels``). The README's
test command is the ``pytest`` entry point, which does not add the working directory. For
``python -m pytest``, which does, the root is dropped here, before any test module imports
transformers; a ``kernels`` module already imported from the root is an error that says why.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == ROOT
    except OSError:
        return False


sys.path[:] = [p for p in sys.path if not _is_root(p)]
for _name in ("kernels", "scheduler"):
    _mod = sys.modules.get(_name)
    _file = getattr(_mod, "__file__", None) or ""
    if _file and Path(_file).resolve().is_relative_to(ROOT):
        raise ImportError(
            f"'{_name}' was imported from the repository root ({_file}); run the tests with the "
            "`pytest` entry point (not `python -m pytest` from the root)"
        )
