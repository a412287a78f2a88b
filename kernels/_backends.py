"""Which kernel libraries are installed and usable here, and why not when they are not.

Probing imports each library lazily inside a try: a failing import makes the backend
unavailable with the exception text as the reason, never an error. Results are cached.
"""

from __future__ import annotations

import functools
import importlib
from dataclasses import dataclass

import torch

BACKENDS = ("torch", "triton", "flashinfer", "flash_attn", "xformers", "liger_kernel")


@dataclass(frozen=True, slots=True)
class BackendStatus:
    name: str
    available: bool
    version: str | None
    reason: str


def _import(module: str):
    try:
        return importlib.import_module(module), None
    except Exception as e:  # ImportError, OSError from a missing .so, RuntimeError on init...
        return None, f"import failed: {type(e).__name__}: {e}".splitlines()[0][:300]


def _version(mod) -> str | None:
    return getattr(mod, "__version__", None)


def _needs_cuda(name: str, mod) -> BackendStatus:
    if not torch.cuda.is_available():
        return BackendStatus(name, False, _version(mod), "installed, but no CUDA device")
    return BackendStatus(name, True, _version(mod), "")


def _probe_xformers(mod) -> BackendStatus:
    """xformers imports even when its C++/CUDA extension does not load (built for another
    torch): then memory_efficient_attention has no CUDA operator. Check the extension."""
    ver = _version(mod)
    if getattr(mod, "_has_cpp_library", None) is False:
        return BackendStatus(
            "xformers", False, ver, "its C++/CUDA extension did not load (built for another torch)"
        )
    if not torch.cuda.is_available():
        return BackendStatus("xformers", False, ver, "installed, but no CUDA device")
    try:
        import xformers.ops as xops

        q = torch.zeros(1, 16, 1, 64, device="cuda", dtype=torch.float16)
        xops.memory_efficient_attention(q, q, q)
    except Exception as e:
        return BackendStatus(
            "xformers",
            False,
            ver,
            f"memory_efficient_attention unusable: {type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}",
        )
    return BackendStatus("xformers", True, ver, "")


@functools.cache
def probe_backend(name: str) -> BackendStatus:
    """Availability of one backend (cached; see ``clear_probe_cache``). Never raises."""
    try:
        return _probe(name)
    except Exception as e:  # a probe must not take the server down
        return BackendStatus(name, False, None, f"probe failed: {type(e).__name__}: {e}"[:300])


def _probe(name: str) -> BackendStatus:
    if name == "torch":
        return BackendStatus("torch", True, torch.__version__, "")
    module = {"flash_attn": "flash_attn", "liger_kernel": "liger_kernel"}.get(name, name)
    if name not in BACKENDS:
        return BackendStatus(name, False, None, "unknown backend")
    mod, err = _import(module)
    if mod is None:
        return BackendStatus(name, False, None, err or "import failed")
    if name == "xformers":
        return _probe_xformers(mod)
    if name == "triton" and not torch.cuda.is_available():
        return BackendStatus(
            name,
            False,
            _version(mod),
            "installed; no CUDA device (kernels run only under TRITON_INTERPRET=1)",
        )
    return _needs_cuda(name, mod)


def probe_all() -> dict[str, BackendStatus]:
    return {b: probe_backend(b) for b in BACKENDS}


def clear_probe_cache() -> None:
    probe_backend.cache_clear()
