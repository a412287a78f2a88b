"""The layering holds (ARCHITECTURE.md, "Who owns what"): an AST walk of every module's imports,
with the package-dir remap (``kernels/`` is ``layerzero_serve.kernels``, ``scheduler/`` is
``layerzero_serve.scheduler``), lazy imports included, ``TYPE_CHECKING`` blocks excluded.

- no module imports another package's private (``_name``) module;
- ``kernels`` imports nothing of the runtime but ``errors``;
- ``scheduler`` imports only the shared types, errors and the KV protocol;
- ``errors``, ``request`` and ``types`` are leaves;
- ``config`` imports no component's private module (covered by the first rule).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _graph_module():
    spec = importlib.util.spec_from_file_location("lz_import_graph", ROOT / "bench/import_graph.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def graph():
    g = _graph_module()
    return g, g.module_imports(ROOT)


def test_the_walk_sees_the_remapped_packages(graph):
    g, edges = graph
    names = {name for name, _ in g.iter_modules(ROOT)}
    assert "layerzero_serve.kernels.spec" in names and "layerzero_serve.scheduler" in names
    assert any(e.importer.startswith("layerzero_serve.scheduler.") for e in edges)
    assert any(e.importer.startswith("layerzero_serve.kernels.") for e in edges)


def test_no_private_or_upward_imports(graph):
    g, edges = graph
    bad = g.violations(edges)
    assert bad["private"] == [], "\n".join(bad["private"])
    assert bad["upward"] == [], "\n".join(bad["upward"])


def test_the_rules_catch_what_they_must():
    """Mutants: each rule flags a hand-made edge of its kind."""
    g = _graph_module()
    edge = g.Edge
    cases = {
        "private": [
            edge("layerzero_serve.runner.cuda_graph", "layerzero_serve.kv_cache._storage", "x:1"),
            edge("layerzero_serve.config", "layerzero_serve.spec_decode._proposer", "x:2"),
        ],
        "upward": [
            edge("layerzero_serve.kernels.metadata", "layerzero_serve.kv_cache", "x:3"),
            edge("layerzero_serve.scheduler._scheduler", "layerzero_serve.kv_cache", "x:4"),
            edge("layerzero_serve.types", "layerzero_serve.sampling", "x:5"),
        ],
    }
    for kind, edges in cases.items():
        assert len(g.violations(edges)[kind]) == len(edges), kind
    ok = [
        edge("layerzero_serve.selection._selector", "layerzero_serve._envs", "y:1"),
        edge("layerzero_serve.kv_cache._manager", "layerzero_serve.kv_cache._block_pool", "y:2"),
        edge("layerzero_serve.scheduler._scheduler", "layerzero_serve.kv_cache.protocol", "y:3"),
        edge("layerzero_serve.kernels._torch_backend", "layerzero_serve.errors", "y:4"),
    ]
    bad = g.violations(ok)
    assert bad["private"] == [] and bad["upward"] == []
