"""Engine configuration: one frozen dataclass, validated on construction, and ``resolve()``
that turns every "auto" into a concrete, logged choice."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from layerzero_serve.errors import ValidationError
from layerzero_serve.kv_cache._hashing import HASH_ALGORITHMS
from layerzero_serve.spec_decode._proposer import Proposer

logger = logging.getLogger("layerzero_serve")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MODEL = "default"
_CPU_KV_BYTES = 512 << 20


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything an Engine needs. Defaults suit a CPU demo and a single GPU alike.

    Attributes:
        model: a Hugging Face checkpoint directory, a dummy preset (``dummy:tiny``,
            ``dummy:llama3.2-1b``, ``dummy:llama3-8b``) or ``"default"`` (the embedded demo
            model, written once under ``LZ_CACHE_DIR``).
        dtype: ``auto`` (the checkpoint's dtype on GPU, float32 on CPU), float32, bfloat16, float16.
        device: ``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:N``.
        block_size: tokens per KV block (1..256).
        num_kv_blocks / kv_cache_bytes: size the KV pool by a block count or a byte budget (at
            most one; default: 512 MiB on CPU, ``gpu_memory_utilization`` of the GPU).
        gpu_memory_utilization: fraction of GPU memory the engine may use, in (0, 1].
        max_model_len: longest sequence (prompt + output); None = the model's limit.
        max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, max_prefill_chunk, policy:
            scheduler budgets and policy (see SchedulerConfig).
        enable_prefix_caching, prefix_hash: prefix cache on/off and its hash (sha256 | fast).
        seed: seed of the sampler's shared generator (unseeded requests).
        cpu_threads: torch intra-op threads when running on the CPU; None = measure 1 thread
            against torch's default on the model's width at start-up and keep the faster.
        enforce_eager: never capture CUDA graphs (the reference for graph correctness).
        max_graph_batch: largest captured decode bucket (None = min(max_num_seqs, 256));
            buckets are 1, 2, 4, 8, then every 8. Larger batches run eagerly.
        speculative_method: None (off), ``"ngram"`` (prompt lookup, no extra model),
            ``"draft_model"`` (greedy drafts from ``speculative_model``) or your own
            :class:`~layerzero_serve.spec_decode.Proposer` instance.
        speculative_model: the draft checkpoint (or dummy preset) for ``"draft_model"``; it
            must share the target's vocabulary.
        num_speculative_tokens: largest number of drafts per request and step, 1..16.
        ngram_min, ngram_max: n-gram sizes the lookup tries (longest first), 1 <= min <= max.
        adaptive_speculation: choose the number of drafts per step from the batch size and the
            measured acceptance rate (0 = plain decoding when drafts would not pay off);
            False = always ``num_speculative_tokens``.
        async_scheduling: with CUDA graphs, launch the next pure decode step before the host
            processes this step's tokens (its input ids come from this step's sampler on the
            device), so the host's per-step work overlaps the GPU's. Same tokens as without.
    """

    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048
    enable_chunked_prefill: bool = True
    max_prefill_chunk: int = 0
    policy: str = "fcfs"
    enable_prefix_caching: bool = True
    prefix_hash: str = "sha256"
    seed: int = 0
    cpu_threads: int | None = None
    enforce_eager: bool = False
    max_graph_batch: int | None = None
    speculative_method: str | Proposer | None = None
    speculative_model: str | None = None
    num_speculative_tokens: int = 4
    ngram_min: int = 2
    ngram_max: int = 4
    adaptive_speculation: bool = True
    async_scheduling: bool = True

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValidationError("dtype", self.dtype, f"'auto' or one of {tuple(DTYPES)}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValidationError("device", self.device, "'auto', 'cpu', 'cuda' or 'cuda:N'")
        if not isinstance(self.block_size, int) or not 1 <= self.block_size <= 256:
            raise ValidationError("block_size", self.block_size, "an integer in [1, 256]")
        if self.num_kv_blocks is not None and self.kv_cache_bytes is not None:
            raise ValidationError("num_kv_blocks/kv_cache_bytes", "both", "at most one of them")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 2:
            raise ValidationError("num_kv_blocks", self.num_kv_blocks, ">= 2")
        if self.kv_cache_bytes is not None and self.kv_cache_bytes <= 0:
            raise ValidationError("kv_cache_bytes", self.kv_cache_bytes, "> 0")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValidationError("gpu_memory_utilization", self.gpu_memory_utilization, "(0, 1]")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValidationError("max_model_len", self.max_model_len, ">= 2 or None")
        if self.cpu_threads is not None and (
            not isinstance(self.cpu_threads, int) or self.cpu_threads < 1
        ):
            raise ValidationError("cpu_threads", self.cpu_threads, "an integer >= 1 or None")
        if self.max_graph_batch is not None and not 1 <= self.max_graph_batch <= 1024:
            raise ValidationError("max_graph_batch", self.max_graph_batch, "[1, 1024] or None")
        method = self.speculative_method
        if not (method in (None, "ngram", "draft_model") or isinstance(method, Proposer)):
            allowed = "None, 'ngram', 'draft_model' or a spec_decode.Proposer instance"
            raise ValidationError("speculative_method", method, allowed)
        if (method == "draft_model") != (self.speculative_model is not None):
            raise ValidationError(
                "speculative_model",
                self.speculative_model,
                "a draft checkpoint exactly when speculative_method='draft_model'",
            )
        k = self.num_speculative_tokens
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= 16:
            raise ValidationError("num_speculative_tokens", k, "an integer in [1, 16]")
        lo, hi = self.ngram_min, self.ngram_max
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, hi)) or not (
            1 <= lo <= hi <= 32
        ):
            raise ValidationError(
                "ngram_min/ngram_max", (lo, hi), "1 <= ngram_min <= ngram_max <= 32"
            )
        for name in ("adaptive_speculation", "async_scheduling"):
            if not isinstance(getattr(self, name), bool):
                raise ValidationError(name, getattr(self, name), "a bool")
        if self.prefix_hash not in HASH_ALGORITHMS:
            raise ValidationError("prefix_hash", self.prefix_hash, f"one of {HASH_ALGORITHMS}")


@dataclass(frozen=True, slots=True)
class ResolvedConfig:
    """The concrete choices behind an EngineConfig for one model on one device."""

    device: torch.device
    dtype: torch.dtype
    max_model_len: int


def resolve(
    cfg: EngineConfig, model_max_len: int, checkpoint_dtype: torch.dtype | None
) -> ResolvedConfig:
    """Pick device, dtype and max length; log each choice and why."""
    if cfg.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        why = "CUDA available" if device.type == "cuda" else "no CUDA device"
    else:
        device = torch.device(cfg.device)
        why = "requested"
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValidationError("device", cfg.device, "'cpu' (no CUDA device is available)")
    if cfg.dtype != "auto":
        dtype, dwhy = DTYPES[cfg.dtype], "requested"
    elif device.type == "cpu":
        dtype, dwhy = torch.float32, "CPU default"
    else:
        dtype = checkpoint_dtype if checkpoint_dtype in DTYPES.values() else torch.bfloat16
        dwhy = "checkpoint dtype" if checkpoint_dtype in DTYPES.values() else "GPU default"
    max_len = model_max_len if cfg.max_model_len is None else cfg.max_model_len
    if max_len > model_max_len:
        raise ValidationError("max_model_len", cfg.max_model_len, f"<= {model_max_len} (model)")
    logger.info(
        "device=%s (%s), dtype=%s (%s), max_model_len=%d",
        device,
        why,
        str(dtype).removeprefix("torch."),
        dwhy,
        max_len,
    )
    return ResolvedConfig(device=device, dtype=dtype, max_model_len=max_len)


def kv_budget_bytes(cfg: EngineConfig, device: torch.device) -> int:
    """Bytes for the KV pool when no block count is given."""
    if cfg.kv_cache_bytes is not None:
        return cfg.kv_cache_bytes
    if device.type != "cuda":
        return _CPU_KV_BYTES
    free, total = torch.cuda.mem_get_info(device)
    used = total - free
    # Leave room for the activations of the largest prefill batch (a fixed reserve; CUDA-graph
    # memory is measured and subtracted separately by the engine).
    budget = int(total * cfg.gpu_memory_utilization) - used - (2 << 30)
    if budget <= 0:
        raise ValidationError(
            "gpu_memory_utilization",
            cfg.gpu_memory_utilization,
            f"a larger fraction: {used / 2**30:.1f} GiB already in use",
        )
    return budget
