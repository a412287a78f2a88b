"""Turn a SchedulerOutput into model inputs: packed token ids, positions, attention metadata.

Host work is vectorised with numpy (no per-token Python loop): token ids are gathered with list
slices per request, positions/slots/offsets come from array arithmetic, and everything crosses
to the device in one copy per tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import chain

import numpy as np
import torch

from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kv_cache import BlockTableCache, build_block_table, build_positions
from layerzero_serve.types import SchedulerOutput


@dataclass(slots=True)
class ForwardBatch:
    """Inputs of one forward pass.

    Attributes:
        input_ids: int64 ``[T]`` packed tokens of every row (device).
        positions: int64 ``[T]`` position of each token in its sequence (device).
        meta: attention metadata (device tensors + host mirrors).
        sample_indices: int64 ``[S]`` index into the T tokens of each row that samples: its last
            token (device).
        sample_rows: host list of the schedule rows that sample, in order (length S).
        host: the host arrays the device tensors were made from (``HostBatch``): what a
            tensor-parallel rank 0 sends its workers so they build the same batch.
    """

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_indices: torch.Tensor
    sample_rows: list[int]
    host: HostBatch | None = None


@dataclass(slots=True)
class HostBatch:
    """Host (numpy int64) arrays of one forward batch: ``tokens [T]``, ``positions [T]``,
    ``qsl [n + 1]`` (query start offsets), ``ends [n]`` (sequence lengths after the step),
    ``table [n, W]`` (block ids), ``slots [T]`` and ``sample_idx [S]``."""

    tokens: np.ndarray
    positions: np.ndarray
    qsl: np.ndarray
    ends: np.ndarray
    table: np.ndarray
    slots: np.ndarray
    sample_idx: np.ndarray


def _pin(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Host tensor -> device. Small metadata goes straight from pageable memory: pinning a
    fresh buffer every step costs more than the copy (the graph path keeps one pinned
    staging buffer instead)."""
    if device.type == "cpu":
        return t
    return t.to(device)


def prepare_batch(
    out: SchedulerOutput,
    block_size: int,
    device: torch.device,
    tables: BlockTableCache | None = None,
) -> ForwardBatch:
    """Build a ForwardBatch for ``out`` (host work + one copy per tensor). Not graph-captured.
    ``tables`` keeps block-table rows between steps (else the table is rebuilt)."""
    reqs = out.requests
    starts = np.asarray(out.starts, dtype=np.int64)
    lens = np.asarray(out.num_scheduled, dtype=np.int64)
    ends = starts + lens
    tokens = list(
        chain.from_iterable(
            (
                r.all_token_ids[s:e]
                if e <= len(r.all_token_ids)
                else (r.all_token_ids + out.drafts[r.request_id])[s:e]
            )
            for r, s, e in zip(reqs, out.starts, ends.tolist(), strict=True)
        )
    )
    table = (
        build_block_table(out.block_ids)
        if tables is None
        else tables.build(out.block_ids, out.table_edits)
    )
    seq_index, positions = build_positions(starts, lens)
    slots = (
        table[seq_index, positions // block_size].astype(np.int64) * block_size
        + positions % block_size
    )
    qsl = np.zeros(len(reqs) + 1, dtype=np.int64)
    np.cumsum(lens, out=qsl[1:])
    num_tokens = [len(r.all_token_ids) for r in reqs]
    sample_rows = [
        i for i, (e, n) in enumerate(zip(ends.tolist(), num_tokens, strict=True)) if e >= n
    ]
    sample_idx = qsl[1:][sample_rows] - 1
    host = HostBatch(
        np.asarray(tokens, dtype=np.int64), positions, qsl, ends, table, slots, sample_idx
    )
    return batch_from_host(host, block_size, device, sample_rows)


def batch_from_host(
    host: HostBatch, block_size: int, device: torch.device, sample_rows: list[int]
) -> ForwardBatch:
    """The device batch of ``host`` (one copy per tensor). Not graph-captured."""
    qsl, ends, table = host.qsl, host.ends, host.table
    lens = np.diff(qsl)
    meta = AttentionMetadata(
        num_seqs=len(ends),
        num_tokens=len(host.tokens),
        block_size=block_size,
        query_start_loc=_pin(torch.from_numpy(qsl.astype(np.int32)), device),
        seq_lens=_pin(torch.from_numpy(ends.astype(np.int32)), device),
        block_tables=_pin(torch.from_numpy(table), device),
        slot_mapping=_pin(torch.from_numpy(host.slots.astype(np.int32)), device),
        max_query_len=int(lens.max(initial=0)),
        max_seq_len=int(ends.max(initial=0)),
        query_start_loc_cpu=qsl.tolist(),
        seq_lens_cpu=ends.tolist(),
        block_tables_cpu=table,
    )
    return ForwardBatch(
        input_ids=_pin(torch.from_numpy(host.tokens), device),
        positions=_pin(torch.from_numpy(host.positions), device),
        meta=meta,
        sample_indices=_pin(torch.from_numpy(host.sample_idx), device),
        sample_rows=sample_rows,
        host=host,
    )
