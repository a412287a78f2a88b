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
