"""Every kernel the project knows about: the SPECS of each adapter module. Importing an adapter
module does not import its third-party library (factories import lazily)."""

from __future__ import annotations

import importlib

from layerzero_serve.kernels.spec import KernelSpec

ADAPTER_MODULES = (
    "layerzero_serve.kernels._torch_backend",
    "layerzero_serve.kernels._flashinfer_backend",
    "layerzero_serve.kernels._triton.backend",
    "layerzero_serve.kernels._triton.layer_ops",
    "layerzero_serve.kernels._triton.sampling",
    "layerzero_serve.kernels._triton.topk_sampling",
    "layerzero_serve.kernels._liger_backend",
    "layerzero_serve.kernels._flash_attn_backend",
    "layerzero_serve.kernels._xformers_backend",
    "layerzero_serve.kernels._triton.rejection_sampling",
    "layerzero_serve.kernels._flashinfer_rejection",
)


def all_specs() -> list[KernelSpec]:
    """Specs of every adapter module present in this installation."""
    out: list[KernelSpec] = []
    for name in ADAPTER_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):
                raise
            continue
        out.extend(mod.SPECS)
    return out
