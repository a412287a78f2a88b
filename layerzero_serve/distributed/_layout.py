"""How one model is cut across ``N`` tensor-parallel ranks (Megatron style), and the check that
it can be.

* q/k/v and gate/up are column-parallel (each rank holds a contiguous range of heads / of the
  intermediate units); o and down are row-parallel (the matching input columns), each followed
  by one all-reduce. A row-parallel bias is held by rank 0 only (the others hold zeros), so the
  all-reduce adds it once.
* The embedding and the LM head are vocabulary-parallel: rank ``r`` holds rows
  ``[r * Vp / N, (r + 1) * Vp / N)`` of the vocabulary padded to ``Vp`` (a multiple of ``N``);
  padding rows are zeros and their logits are cut off after the gather.
* KV heads are split when ``N`` divides their count; when ``N`` is a multiple of it each KV head
  is replicated on ``N / num_kv_heads`` consecutive ranks (exactly the ranks whose query heads
  read it).
* Norm weights (and Qwen3's per-head q/k norms) are replicated.

``shard(name, tensor_like, layout)`` cuts one checkpoint tensor (a torch tensor or a
safetensors slice: only the rows / columns of this rank are read).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from layerzero_serve.errors import ValidationError, check_int

MAX_TENSOR_PARALLEL = 1024


class TensorParallelError(ValidationError):
    """``tensor_parallel_size`` does not fit the model or the machine (names the reason)."""


@dataclass(frozen=True, slots=True)
class TPLayout:
    """This rank's share of the model.

    Attributes:
        rank, world_size: position in the tensor-parallel group.
        num_heads, num_kv_heads: query / KV heads held here (the model's ``/ world_size``;
            KV heads at least 1, replicated when the world is larger than their count).
        kv_head_start: index of the first KV head held here.
        intermediate_size: MLP units held here.
        vocab_start, vocab_end: the vocabulary rows held here (of the padded vocabulary).
        vocab_size: the model's real vocabulary size (logits are cut back to it).
    """

    rank: int
    world_size: int
    num_heads: int
    num_kv_heads: int
    kv_head_start: int
    intermediate_size: int
    vocab_start: int
    vocab_end: int
    vocab_size: int

    @property
    def local_vocab(self) -> int:
        return self.vocab_end - self.vocab_start

    @classmethod
    def of(cls, mc, rank: int, world_size: int) -> TPLayout:
        """The layout of ``rank`` for model config ``mc`` (checked by
        :func:`check_tensor_parallel` first)."""
        hq, hkv, n = mc.num_heads, mc.num_kv_heads, world_size
        local_kv = max(1, hkv // n)
        kv_start = rank * hkv // n if n > hkv else rank * local_kv
        per_rank = -(-mc.vocab_size // n)
        return cls(
            rank=rank,
            world_size=n,
            num_heads=hq // n,
            num_kv_heads=local_kv,
            kv_head_start=kv_start,
            intermediate_size=mc.intermediate_size // n,
            vocab_start=rank * per_rank,
            vocab_end=(rank + 1) * per_rank,
            vocab_size=mc.vocab_size,
        )


CPU_RANKS_PER_CORE = 4  # gloo ranks on the CPU share cores (one thread each)


def device_count(device_type: str) -> int:
    """Ranks one host can give: its CUDA devices, or ``CPU_RANKS_PER_CORE`` gloo ranks per
    CPU core."""
    if device_type == "cuda":
        return torch.cuda.device_count()
    return CPU_RANKS_PER_CORE * (os.cpu_count() or 1)


def check_tensor_parallel(size: object, mc, device_type: str | None = None) -> int:
    """``size`` as an int after checking it against the model ``mc`` (heads, KV heads and MLP
    width must split evenly) and, when ``device_type`` is given, the devices of this host.

    Raises:
        TensorParallelError: (a ValidationError naming ``tensor_parallel_size``) otherwise.
    """
    n = check_int("tensor_parallel_size", size, 1, MAX_TENSOR_PARALLEL)
    if n == 1:
        return n
    hq, hkv, inter = mc.num_heads, mc.num_kv_heads, mc.intermediate_size
    problems = []
    if hq % n:
        problems.append(f"it must divide the {hq} attention heads")
    if hkv % n and n % hkv:
        problems.append(f"it must divide the {hkv} KV heads or be a multiple of them")
    if inter % n:
        problems.append(f"it must divide intermediate_size={inter}")
    if problems:
        divisors = [d for d in range(1, hq + 1) if hq % d == 0 and inter % d == 0
                    and (hkv % d == 0 or d % hkv == 0)]  # fmt: skip
        raise TensorParallelError(
            "tensor_parallel_size", n, f"one of {divisors} for this model", "; ".join(problems)
        )
    if device_type is not None:
        have = device_count(device_type)
        if n > have:
            what = "CUDA devices" if device_type == "cuda" else "CPU cores x 4"
            raise TensorParallelError(
                "tensor_parallel_size", n, f"at most {have} (the {what} of this host)"
            )
    return n


# ---- cutting checkpoint tensors ---------------------------------------------------------------
_COLUMN_Q = ("self_attn.q_proj.weight", "self_attn.q_proj.bias")
_COLUMN_KV = (
    "self_attn.k_proj.weight",
    "self_attn.k_proj.bias",
    "self_attn.v_proj.weight",
    "self_attn.v_proj.bias",
)
_COLUMN_MLP = ("mlp.gate_proj.weight", "mlp.up_proj.weight")
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def shard_range(name: str, layout: TPLayout, head_dim: int) -> tuple[int, int, int] | None:
    """``(dim, start, stop)`` of parameter ``name`` held by this rank, or None when replicated
    (norms) or special (row-parallel biases: see :func:`shard`)."""
    lay, d = layout, head_dim
    if name.endswith(_COLUMN_Q):
        start = lay.rank * lay.num_heads * d
        return 0, start, start + lay.num_heads * d
    if name.endswith(_COLUMN_KV):
        start = lay.kv_head_start * d
        return 0, start, start + lay.num_kv_heads * d
    if name.endswith(_COLUMN_MLP):
        start = lay.rank * lay.intermediate_size
        return 0, start, start + lay.intermediate_size
    if name.endswith("self_attn.o_proj.weight"):
        start = lay.rank * lay.num_heads * d
        return 1, start, start + lay.num_heads * d
    if name.endswith("mlp.down_proj.weight"):
        start = lay.rank * lay.intermediate_size
        return 1, start, start + lay.intermediate_size
    if name in _VOCAB:
        return 0, lay.vocab_start, lay.vocab_end
    return None


def shard(name: str, source, layout: TPLayout, head_dim: int, full_shape) -> torch.Tensor:
    """This rank's piece of checkpoint tensor ``name``: ``source`` is a tensor or a safetensors
    slice (indexing reads only the piece); ``full_shape`` its shape. Vocabulary rows past the
    real vocabulary are zeros; a row-parallel bias is the full bias on rank 0, zeros elsewhere.
    """
    if name.endswith("self_attn.o_proj.bias"):
        t = source[:]
        return t if layout.rank == 0 else torch.zeros_like(t)
    cut = shard_range(name, layout, head_dim)
    if cut is None:
        return source[:]
    dim, start, stop = cut
    real_stop = min(stop, full_shape[dim])
    if dim == 0:
        piece = source[start:real_stop] if start < real_stop else None
    else:
        piece = source[:, start:real_stop]
    if piece is not None and real_stop == stop:
        return piece
    # vocabulary padding: zero rows after the real ones
    rows = stop - start
    out_shape = (rows, *full_shape[1:])
    ref = source[0:1] if piece is None else piece
    padded = torch.zeros(out_shape, dtype=ref.dtype, device=ref.device)
    if piece is not None:
        padded[: piece.shape[0]] = piece
    return padded
