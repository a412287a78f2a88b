"""The split-KV rule of the project's Triton paged-decode kernel, for the runner's bucket
planning: how many KV splits a batch gets, and the device's SM count. Imports Triton.

CUDA graphs: host only.
"""

from __future__ import annotations

from layerzero_serve.kernels._triton.paged_decode import choose_num_splits, num_sms

__all__ = ["choose_num_splits", "num_sms"]
