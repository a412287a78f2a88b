"""layerzero_serve: a runtime library for serving decoder LLMs on GPUs.

``LLM`` and ``Engine`` import the model stack lazily, so ``import layerzero_serve`` stays cheap
for code that only needs the KV cache or the scheduler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:  # pragma: no cover
    from layerzero_serve.engine import Engine
    from layerzero_serve.llm import LLM
    from layerzero_serve.sampling import SamplingParams

_LAZY = {
    "LLM": "layerzero_serve.llm",
    "Engine": "layerzero_serve.engine",
    "EngineConfig": "layerzero_serve.config",
    "SamplingParams": "layerzero_serve.sampling",
}

__all__ = ["Engine", "EngineConfig", "LLM", "SamplingParams", "__version__"]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'layerzero_serve' has no attribute {name!r}")
