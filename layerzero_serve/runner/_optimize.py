"""The GPU fast path of a loaded model: fused projections and the selected layer kernels."""

from __future__ import annotations

import logging

import torch

from layerzero_serve.kernels.spec import Op
from layerzero_serve.selection import Selector, get_selector, probe_device
from layerzero_serve.selection.plans import ModelShape, base_context

logger = logging.getLogger("layerzero_serve")


def optimize_model(
    model: torch.nn.Module,
    shape: ModelShape,
    device: torch.device,
    block_size: int,
    max_num_seqs: int,
    selector: Selector | None = None,
) -> None:
    """GPU fast path, before memory is measured: fuse the q/k/v and gate/up projections and
    install the RMSNorm/SwiGLU/RoPE kernels the selection engine picks for this device."""
    sel = selector or get_selector()
    dev = probe_device(device)
    impls, names = {}, {}
    for op in (Op.RMSNORM, Op.SWIGLU, Op.ROPE):
        ctx = base_context(
            op,
            device=dev,
            shape=shape,
            block_size=block_size,
            batch_bucket=max_num_seqs,
            q_len=0,
            graph_mode=True,
        )
        choice, impls[op] = sel.build(op, ctx)
        names[op.value] = choice.name
        logger.info("%s kernel: %s", op.value, choice.name)
    if hasattr(model, "optimize"):
        model.layer_kernels = names  # what tensor-parallel ranks compare at start-up
        model.optimize(
            fuse=True, rmsnorm=impls[Op.RMSNORM], swiglu=impls[Op.SWIGLU], rope=impls[Op.ROPE]
        )
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the unfused weights' blocks go back before KV sizing
