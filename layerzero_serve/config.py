"""Engine configuration: one frozen dataclass, validated on construction, and ``resolve()``
that turns every "auto" into a concrete, logged choice."""

from __future__ import annotations

import difflib
import logging
import math
import numbers
import os
import re
from dataclasses import dataclass

import torch

from layerzero_serve.distributed import MAX_TENSOR_PARALLEL
from layerzero_serve.errors import ValidationError, check_int
from layerzero_serve.kv_cache import HASH_ALGORITHMS, KV_CACHE_DTYPES, MAX_NUM_BLOCKS
from layerzero_serve.runner import MAX_CPU_THREADS
from layerzero_serve.scheduler import check_admission
from layerzero_serve.spec_decode import Proposer

logger = logging.getLogger("layerzero_serve")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_MODEL = "default"
_CPU_KV_BYTES = 512 << 20
MAX_KV_CACHE_BYTES = 1 << 50  # 1 PiB: far above any device, far below int64 overflow
MAX_NUM_SEQS = 1 << 16  # rows of the persistent per-step buffers (sampler, runner)
INT32_MAX = (1 << 31) - 1  # positions, token counts and slots are int32 on the device
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
_DEVICE_RE = re.compile(r"auto|cpu|cuda(:[0-9]+)?")
_BOOL_FIELDS = (
    "enable_chunked_prefill",
    "enable_prefix_caching",
    "enforce_eager",
    "adaptive_speculation",
    "async_scheduling",
)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Everything an Engine needs. Defaults suit a CPU demo and a single GPU alike.

    Attributes:
        model: a Hugging Face checkpoint directory, a dummy preset (``dummy:tiny``,
            ``dummy:llama3.2-1b``, ``dummy:llama3-8b``) or ``"default"`` (the embedded demo
            model, written once under ``LZ_CACHE_DIR``); a ``pathlib.Path`` is stored as str.
        dtype: ``auto`` (the checkpoint's dtype on GPU, float32 on CPU), float32, bfloat16, float16.
        device: ``auto`` (cuda if available), ``cpu``, ``cuda``, ``cuda:N`` (or a torch.device).
        block_size: tokens per KV block (1..256).
        num_kv_blocks / kv_cache_bytes: size the KV pool by a block count (2..2**24) or a byte
            budget (1..2**50; a budget worth more than 2**24 blocks is not used up) (at most
            one; default: 512 MiB on CPU, ``gpu_memory_utilization`` of the GPU).
        gpu_memory_utilization: fraction of GPU memory the engine may use, in (0, 1].
        kv_cache_dtype: ``auto`` (K/V in the model's dtype), ``fp8_e4m3`` or ``fp8_e5m2`` (one
            byte per value, twice the tokens per byte of a 16-bit cache; per-layer scales from
            the checkpoint's ``self_attn.k_scale`` / ``v_scale`` tensors, else 1.0).
        max_model_len: longest sequence (prompt + output), 2..2**31-1; None = the model's limit.
        max_num_seqs, max_num_batched_tokens, enable_chunked_prefill, max_prefill_chunk, policy:
            scheduler budgets and policy (see SchedulerConfig); max_num_seqs in 1..65536, token
            counts up to 2**31-1.
        enable_prefix_caching, prefix_hash: prefix cache on/off and its hash (sha256 | fast).
        seed: seed of the sampler's shared generator (unseeded requests), an int64.
        cpu_threads: torch intra-op threads when running on the CPU, 1..max(4 * CPUs, 256);
            None = measure 1 thread against torch's default on the model's width at start-up
            and keep the faster.
        enforce_eager: never capture CUDA graphs (the reference for graph correctness).
        max_graph_batch: largest captured decode bucket (None = min(max_num_seqs, 256));
            buckets are 1, 2, 4, 8, then every 8. Larger batches run eagerly.
        max_mixed_graph_tokens: largest token count of a prefill or mixed prefill + decode step
            captured piecewise (graphs between the attention calls, token buckets 16, 32, 64,
            128, 192, ... up to this), 0..65536; None = min(max_num_batched_tokens, 2048);
            0 = such steps run eagerly. Larger steps run eagerly.
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
            Under tensor parallelism the launched-ahead ids reach the workers on the device.
        tensor_parallel_size: ranks the model is sharded over (Megatron style: heads, MLP
            units and vocabulary split; see ``layerzero_serve.distributed``), 1..1024. It must
            divide the attention heads and the MLP width, and divide the KV heads or be a
            multiple of them; at most the host's CUDA devices (on the CPU, gloo ranks: 4 per
            core). The engine starts ``N - 1`` worker processes (spawn), or joins the ranks of
            ``torchrun``. 1 = no process group.
        distributed_timeout_s: seconds a collective (and the start-up rendezvous) may wait for
            a rank before the step fails and every rank is shut down, in [1, 86400]; a rank
            that dies is seen at once.

    CUDA graphs: a host object; ``enforce_eager``, ``max_graph_batch`` and ``async_scheduling``
    decide what the engine captures and replays.
    """

    model: str = DEFAULT_MODEL
    dtype: str = "auto"
    device: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None
    kv_cache_bytes: int | None = None
    gpu_memory_utilization: float = 0.9
    kv_cache_dtype: str = "auto"
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
    max_mixed_graph_tokens: int | None = None
    speculative_method: str | Proposer | None = None
    speculative_model: str | None = None
    num_speculative_tokens: int = 4
    ngram_min: int = 2
    ngram_max: int = 4
    adaptive_speculation: bool = True
    async_scheduling: bool = True
    tensor_parallel_size: int = 1
    distributed_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        # every field's type and range, at construction (ValidationError naming the field)
        self._check_source()
        self._check_memory()
        self._check_scheduling()
        self._check_speculation()

    def _check_source(self) -> None:
        """model, dtype, device (paths and torch.device are stored as str)."""
        model = self.model
        if isinstance(model, os.PathLike):
            model = os.fspath(model)
            object.__setattr__(self, "model", model)
        if not isinstance(model, str) or not model:
            allowed = (
                "a checkpoint directory or .gguf file (str or path), 'dummy:<preset>' or 'default'"
            )
            raise ValidationError("model", self.model, allowed)
        if not isinstance(self.dtype, str) or (self.dtype != "auto" and self.dtype not in DTYPES):
            raise ValidationError("dtype", self.dtype, f"'auto' or one of {tuple(DTYPES)}")
        device = self.device
        if isinstance(device, torch.device):
            device = str(device)
            object.__setattr__(self, "device", device)
        if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device):
            raise ValidationError("device", self.device, "'auto', 'cpu', 'cuda' or 'cuda:N'")

    def _check_memory(self) -> None:
        """block_size and the KV pool's size (blocks, bytes or a share of the GPU)."""
        self._int("block_size", 1, 256)
        self._int("num_kv_blocks", 2, MAX_NUM_BLOCKS, optional=True)
        if not isinstance(self.kv_cache_dtype, str) or self.kv_cache_dtype not in KV_CACHE_DTYPES:
            allowed = f"one of {list(KV_CACHE_DTYPES)}"
            raise ValidationError("kv_cache_dtype", self.kv_cache_dtype, allowed)
        kv_bytes = self.kv_cache_bytes
        if kv_bytes is not None:
            allowed = f"None or a number of bytes in [1, {MAX_KV_CACHE_BYTES}] (2**50)"
            if (
                isinstance(kv_bytes, bool)
                or not isinstance(kv_bytes, numbers.Real)
                or not math.isfinite(kv_bytes)
                or not 1 <= kv_bytes <= MAX_KV_CACHE_BYTES
            ):
                raise ValidationError("kv_cache_bytes", kv_bytes, allowed)
            object.__setattr__(self, "kv_cache_bytes", int(kv_bytes))
        if self.num_kv_blocks is not None and self.kv_cache_bytes is not None:
            raise ValidationError("num_kv_blocks/kv_cache_bytes", "both", "at most one of them")
        util = self.gpu_memory_utilization
        if (
            isinstance(util, bool)
            or not isinstance(util, numbers.Real)
            or not 0.0 < util <= 1.0  # also rejects nan
        ):
            raise ValidationError("gpu_memory_utilization", util, "a float in (0, 1]")

    def _check_scheduling(self) -> None:
        """Lengths, batch limits, switches, policy, hash, seed, threads and graph buckets."""
        self._int("max_model_len", 2, INT32_MAX, optional=True)
        self._int("max_num_seqs", 1, MAX_NUM_SEQS)
        self._int("max_num_batched_tokens", 1, INT32_MAX)
        self._int("max_prefill_chunk", 0, INT32_MAX)
        for name in _BOOL_FIELDS:
            if not isinstance(getattr(self, name), bool):
                raise ValidationError(name, getattr(self, name), "a bool (True or False)")
        check_admission(self.enable_chunked_prefill, self.max_prefill_chunk, self.policy)
        if not isinstance(self.prefix_hash, str) or self.prefix_hash not in HASH_ALGORITHMS:
            raise ValidationError("prefix_hash", self.prefix_hash, f"one of {HASH_ALGORITHMS}")
        self._int("seed", INT64_MIN, INT64_MAX)
        self._int("cpu_threads", 1, MAX_CPU_THREADS, optional=True)
        self._int("max_graph_batch", 1, 1024, optional=True)
        self._int("max_mixed_graph_tokens", 0, 65536, optional=True)
        self._int("tensor_parallel_size", 1, MAX_TENSOR_PARALLEL)
        t = self.distributed_timeout_s
        if (
            isinstance(t, bool)
            or not isinstance(t, numbers.Real)
            or not 1 <= t <= 86400  # also rejects nan
        ):
            raise ValidationError("distributed_timeout_s", t, "seconds in [1, 86400]")
        object.__setattr__(self, "distributed_timeout_s", float(t))  # numpy / Fraction too

    def _check_speculation(self) -> None:
        """The proposer (method, draft checkpoint), k and the n-gram lengths."""
        method = self.speculative_method
        if not (
            (isinstance(method, str) and method in ("ngram", "draft_model"))
            or method is None
            or isinstance(method, Proposer)
        ):
            allowed = "None, 'ngram', 'draft_model' or a spec_decode.Proposer instance"
            raise ValidationError("speculative_method", method, allowed)
        draft = self.speculative_model
        if isinstance(draft, os.PathLike):
            draft = os.fspath(draft)
            object.__setattr__(self, "speculative_model", draft)
        if draft is not None and (not isinstance(draft, str) or not draft):
            allowed = "None or a draft checkpoint directory (str or path) / 'dummy:<preset>'"
            raise ValidationError("speculative_model", self.speculative_model, allowed)
        if (method == "draft_model") != (draft is not None):
            raise ValidationError(
                "speculative_model",
                self.speculative_model,
                "a draft checkpoint exactly when speculative_method='draft_model'",
            )
        self._int("num_speculative_tokens", 1, 16)
        lo, hi = self.ngram_min, self.ngram_max
        if not all(isinstance(x, int) and not isinstance(x, bool) for x in (lo, hi)) or not (
            1 <= lo <= hi <= 32
        ):
            raise ValidationError(
                "ngram_min/ngram_max", (lo, hi), "1 <= ngram_min <= ngram_max <= 32"
            )

    def _int(self, name: str, low: int, high: int, optional: bool = False) -> None:
        """Require field ``name`` to be an integer (not a bool) in ``[low, high]`` (or None when
        ``optional``); numpy integers are stored as ``int``."""
        value = getattr(self, name)
        if optional and value is None:
            return
        object.__setattr__(self, name, check_int(name, value, low, high))


def engine_config(**fields: object) -> EngineConfig:
    """``EngineConfig(**fields)``, with an unknown field name raised as a ValidationError naming
    it (instead of the dataclass's bare TypeError).

    CUDA graphs: a host object."""
    known = EngineConfig.__dataclass_fields__
    for name, value in fields.items():
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValidationError(name, value, f"an EngineConfig field{hint}")
    return EngineConfig(**fields)  # type: ignore[arg-type]


def engine_config_of(config: object, overrides: dict[str, object]) -> EngineConfig:
    """The config of ``Engine(config, **overrides)``: an EngineConfig as is (no overrides), a
    str or path as the model (``Engine("dummy:tiny", max_num_seqs=8)``, like ``LLM(...)``),
    None as ``EngineConfig(**overrides)``; anything else is a ValidationError naming
    ``config``.

    CUDA graphs: a host object."""
    if isinstance(config, (str, os.PathLike)):
        if "model" in overrides:
            raise ValidationError("model", overrides["model"], "given once (positionally)")
        return engine_config(model=config, **overrides)
    if config is None:
        return engine_config(**overrides)
    if not isinstance(config, EngineConfig):
        raise ValidationError("config", config, "an EngineConfig, a model (str or path) or None")
    if overrides:
        raise ValidationError("overrides", sorted(overrides), "none when config is given")
    return config


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
        if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
            n = torch.cuda.device_count()
            raise ValidationError("device", cfg.device, f"'cpu', 'cuda' or 'cuda:N', N < {n}")
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
