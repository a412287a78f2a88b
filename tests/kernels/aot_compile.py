"""Ahead-of-time compile checks of Triton kernels for CUDA targets on a machine without a GPU:
the MLIR pipeline runs anywhere (a GPU run once hit an assertion in Triton 3.6's
thread-locality pass), so CPU CI catches such regressions."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile

import pytest
import torch

NO_PTXAS = 77  # the script's exit status when no usable assembler exists for the target


def run_compile_script(script: str) -> None:
    """Run ``script`` (which calls ``triton.compile`` and exits NO_PTXAS when the assembler is
    missing) in a fresh interpreter without TRITON_INTERPRET; skip where it cannot run."""
    if torch.cuda.is_available():
        pytest.skip("the GPU tests compile the kernel for the real device")
    try:
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        pytest.skip("this triton has no ahead-of-time compile API")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run(  # cwd: never the repository root (its kernels/ would shadow PyPI's)
        [sys.executable, "-c", script],
        env=env,
        capture_output=True,
        text=True,
        cwd=tempfile.gettempdir(),
    )
    if r.returncode == NO_PTXAS:
        pytest.skip("no ptxas for these targets")
    assert r.returncode == 0, r.stderr[-3000:]
