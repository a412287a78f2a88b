"""layerzero_serve: a runtime library for serving decoder LLMs on GPUs.

The public API is ``__all__`` below (documented in ``docs/api.md``); everything else is
internal. Names are imported lazily, on first access, so ``import layerzero_serve`` stays cheap
for code that only needs the KV cache or the scheduler.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerzero_serve._logging import configure_logging as _configure_logging

__version__ = "0.1.0"
_configure_logging()  # LZ_LOG_LEVEL applies to library users too, not only to the CLI

if TYPE_CHECKING:  # pragma: no cover
    from layerzero_serve.async_engine import AsyncEngine
    from layerzero_serve.engine import Engine
    from layerzero_serve.llm import LLM
    from layerzero_serve.sampling import SamplingParams

_LAZY = {
    # offline generation and the engine
    "LLM": "layerzero_serve.llm",
    "Engine": "layerzero_serve.engine",
    "AsyncEngine": "layerzero_serve.async_engine",
    "GenerationResult": "layerzero_serve.outputs",
    "CompletionOutput": "layerzero_serve.outputs",
    "Tokenizer": "layerzero_serve.tokenizer",
    "EngineConfig": "layerzero_serve.config",
    "SamplingParams": "layerzero_serve.sampling",
    "RequestOutput": "layerzero_serve.types",
    "ValidationError": "layerzero_serve.errors",
    # KV cache and scheduler
    "KVCacheManager": "layerzero_serve.kv_cache",
    "KVCache": "layerzero_serve.kv_cache",
    "KVCacheSpec": "layerzero_serve.kv_cache",
    "Scheduler": "layerzero_serve.scheduler",
    "SchedulerConfig": "layerzero_serve.scheduler",
    "Request": "layerzero_serve.types",
    "SchedulerOutput": "layerzero_serve.types",
    # attention, graphs
    "AttentionMetadata": "layerzero_serve.kernels.metadata",
    "AttentionDispatch": "layerzero_serve.runner.attention",
    "build_attention": "layerzero_serve.runner.attention",
    "DecodeGraphRunner": "layerzero_serve.runner.cuda_graph",
    # kernel selection and adapter contracts
    "KernelSpec": "layerzero_serve.kernels.spec",
    "KernelContext": "layerzero_serve.kernels.spec",
    "Op": "layerzero_serve.kernels.spec",
    "PagedAttentionImpl": "layerzero_serve.kernels.attention_api",
    "KVWriter": "layerzero_serve.kernels.attention_api",
    "SamplingKernel": "layerzero_serve.kernels.sampling_api",
    "select": "layerzero_serve.selection",
    "explain": "layerzero_serve.selection",
    "configure": "layerzero_serve.selection",
    "prefer": "layerzero_serve.selection",
    "register_kernel": "layerzero_serve.selection",
    "register_backend": "layerzero_serve.selection",
    # sampling
    "Sampler": "layerzero_serve.sampling",
    # speculative decoding
    "Proposer": "layerzero_serve.spec_decode",
    "NgramProposer": "layerzero_serve.spec_decode",
    "DraftModelProposer": "layerzero_serve.spec_decode.draft_model",
    "SpecVerifier": "layerzero_serve.spec_decode.verifier",
    "rejection_sample": "layerzero_serve.spec_decode",
    "AdaptiveK": "layerzero_serve.spec_decode",
    "SpecDecodeMetrics": "layerzero_serve.spec_decode",
}

__all__ = [
    "AdaptiveK",
    "AsyncEngine",
    "AttentionDispatch",
    "AttentionMetadata",
    "CompletionOutput",
    "DecodeGraphRunner",
    "DraftModelProposer",
    "Engine",
    "EngineConfig",
    "GenerationResult",
    "KVCache",
    "KVCacheManager",
    "KVCacheSpec",
    "KVWriter",
    "KernelContext",
    "KernelSpec",
    "LLM",
    "NgramProposer",
    "Op",
    "PagedAttentionImpl",
    "Proposer",
    "Request",
    "RequestOutput",
    "Sampler",
    "SamplingKernel",
    "SamplingParams",
    "Scheduler",
    "SchedulerConfig",
    "SchedulerOutput",
    "SpecDecodeMetrics",
    "SpecVerifier",
    "Tokenizer",
    "ValidationError",
    "__version__",
    "build_attention",
    "configure",
    "explain",
    "prefer",
    "register_backend",
    "register_kernel",
    "rejection_sample",
    "select",
]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'layerzero_serve' has no attribute {name!r}")
