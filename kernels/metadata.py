"""Per-step attention metadata, passed explicitly to every attention layer (no global state).

Rows are sequences, in the scheduler's order; the batch's query tokens are packed back to back
(sequence i owns tokens ``query_start_loc[i] : query_start_loc[i+1]``). Sequence i's query tokens
sit at positions ``seq_lens[i] - query_lens[i] .. seq_lens[i] - 1``: the KV of every earlier
position is already in the cache (prefix hit, earlier chunk, earlier decode step) and this step
writes the rest through ``slot_mapping`` before attending.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from layerzero_serve.errors import ValidationError
from layerzero_serve.kernels.block_layout import build_slot_mapping


@dataclass(slots=True)
class AttentionMetadata:
    """Tensors live on the model's device; ``*_cpu`` lists mirror them on the host for code
    that must not sync (planning, reference kernels).

    Attributes:
        num_seqs: sequences in the batch (rows).
        num_tokens: packed query tokens (sum of query lengths), incl. padding tokens if any.
        block_size: tokens per KV block.
        query_start_loc: int32 ``[num_seqs + 1]`` CSR offsets of each sequence's query tokens.
        seq_lens: int32 ``[num_seqs]`` KV length of each sequence after this step.
        block_tables: int32 ``[num_seqs, max_blocks_per_seq]`` block ids (0 = null block pad).
        slot_mapping: int32 ``[num_tokens]`` KV slot of each query token; -1 writes nothing.
        max_query_len: longest query of the batch (1 for a pure decode batch).
        max_seq_len: longest ``seq_lens`` entry.
        query_start_loc_cpu: host copy of ``query_start_loc`` as a list.
        seq_lens_cpu: host copy of ``seq_lens`` as a list.
        block_tables_cpu: host copy of ``block_tables`` (int32 numpy), for kernels whose
            planning needs page lists on the host (FlashInfer); None when not provided.

    CUDA graphs: ``from_host`` copies host arrays to the device, outside capture; captured graphs
    read static metadata buffers that the graph runner refills in place before each replay.
    """

    num_seqs: int
    num_tokens: int
    block_size: int
    query_start_loc: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    slot_mapping: torch.Tensor
    max_query_len: int
    max_seq_len: int
    query_start_loc_cpu: list[int]
    seq_lens_cpu: list[int]
    block_tables_cpu: np.ndarray | None = None

    @property
    def is_decode_only(self) -> bool:
        return self.max_query_len == 1

    @classmethod
    def from_host(
        cls,
        query_lens,
        seq_lens,
        block_tables,
        block_size: int,
        device: torch.device | str = "cpu",
        slot_mapping=None,
    ) -> AttentionMetadata:
        """Metadata of one step from host arrays (for engines that schedule on their own).

        Args:
            query_lens: ``[S]`` new tokens of each sequence this step (>= 1).
            seq_lens: ``[S]`` KV length of each sequence after this step (>= query_lens).
            block_tables: ``[S, W]`` block ids per sequence (0 pads), covering ``seq_lens``.
            block_size: tokens per KV block.
            device: where the tensors go (one copy each).
            slot_mapping: ``[T]`` KV slots to use instead of the ones the table gives (-1 for
                padding tokens that must write nothing), or None.

        Returns: metadata whose slot mapping writes sequence i's tokens at positions
        ``seq_lens[i] - query_lens[i] .. seq_lens[i] - 1``. Host work; not graph-captured.
        """
        q = np.asarray(query_lens, dtype=np.int64).reshape(-1)
        n = np.asarray(seq_lens, dtype=np.int64).reshape(-1)
        table = np.asarray(block_tables, dtype=np.int32)
        if table.ndim == 1:
            table = table.reshape(1, -1)
        if not isinstance(block_size, int) or block_size < 1:
            raise ValidationError("block_size", block_size, "an integer >= 1")
        if q.shape != n.shape or table.shape[0] != len(q):
            raise ValidationError(
                "query_lens/seq_lens/block_tables",
                (q.shape, n.shape, table.shape),
                "[S], [S] and [S, W] for the same S",
            )
        if len(q) and (q.min() < 1 or (q > n).any()):
            raise ValidationError("query_lens", q.tolist(), "ints in [1, seq_lens[i]]")
        if len(n) and n.max() > table.shape[1] * block_size:
            raise ValidationError(
                "block_tables", table.shape, f"at least {int(-(-n.max() // block_size))} columns"
            )
        qsl = np.zeros(len(q) + 1, dtype=np.int64)
        np.cumsum(q, out=qsl[1:])
        if slot_mapping is None:
            slots = build_slot_mapping(table, n - q, q, block_size)
        else:
            slots = np.asarray(slot_mapping, dtype=np.int64).reshape(-1)
            if slots.shape != (int(qsl[-1]),):
                raise ValidationError("slot_mapping", slots.shape, f"[{int(qsl[-1])}] (T)")
        dev = torch.device(device)

        def put(a: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(np.ascontiguousarray(a)).to(dev)

        return cls(
            num_seqs=len(q),
            num_tokens=int(qsl[-1]),
            block_size=block_size,
            query_start_loc=put(qsl.astype(np.int32)),
            seq_lens=put(n.astype(np.int32)),
            block_tables=put(table),
            slot_mapping=put(slots.astype(np.int32)),
            max_query_len=int(q.max(initial=0)),
            max_seq_len=int(n.max(initial=0)),
            query_start_loc_cpu=qsl.tolist(),
            seq_lens_cpu=n.tolist(),
            block_tables_cpu=table,
        )
