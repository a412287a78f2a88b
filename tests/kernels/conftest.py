"""Kernel tests run Triton kernels through Triton's interpreter when there is no CUDA device.

``triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is decorated, i.e. when its module is
first imported; this conftest is imported before the test modules of this folder, so setting it
here (at import time) is early enough. With CUDA the kernels compile for the GPU as usual.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
