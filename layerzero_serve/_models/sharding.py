"""Tensor-parallel copies of a model: this rank's share of every parameter (the rules are in
``distributed._layout``). Checkpoints in safetensors are read slice by slice by the loader
(``load_model(..., layout=...)``); a model that already exists whole (dummy weights, a GGUF file
dequantised on load) is cut here."""

from __future__ import annotations

from typing import TYPE_CHECKING

from layerzero_serve._models.llama import LlamaForCausalLM, set_parameter
from layerzero_serve.distributed import shard

if TYPE_CHECKING:
    from layerzero_serve.distributed import TPLayout


def shard_model(full: LlamaForCausalLM, layout: TPLayout) -> LlamaForCausalLM:
    """A new model holding ``layout``'s share of ``full``'s parameters (copies, on ``full``'s
    device; ``full`` can be dropped afterwards). Collectives are installed later
    (``set_tp``)."""
    device = full.device
    local = LlamaForCausalLM(full.config, full.dtype, "meta", layout=layout)
    head_dim = full.config.head_dim
    for name, param in full.named_parameters():
        piece = shard(name, param.data, layout, head_dim, tuple(param.shape))
        set_parameter(local, name, piece.to(device).clone())
    leftover = local.finalize(device)
    if leftover:  # pragma: no cover - every parameter of the full model was cut above
        raise RuntimeError(f"not sharded: {leftover}")
    return local.eval()
