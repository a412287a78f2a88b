"""Tensor parallelism over torch.distributed: how a model is cut across ranks
(:class:`TPLayout`, :func:`shard`), the process groups (:class:`TPGroup`), and, in
``distributed.workers`` / ``distributed.step_mirror``, the worker processes and rank 0's
per-step messages to them.

``Engine(model, tensor_parallel_size=N)`` starts ``N - 1`` worker processes itself; under
``torchrun`` (one process per rank) every rank constructs the Engine and rank 0 drives it.
"""

from layerzero_serve.distributed._group import (
    TPGroup,
    free_port,
    init_group,
    owned_group_open,
    torchrun_rank,
)
from layerzero_serve.distributed._layout import (
    MAX_TENSOR_PARALLEL,
    TensorParallelError,
    TPLayout,
    check_tensor_parallel,
    shard,
    shard_range,
)

__all__ = [
    "MAX_TENSOR_PARALLEL",
    "TPGroup",
    "TPLayout",
    "TensorParallelError",
    "check_tensor_parallel",
    "free_port",
    "init_group",
    "owned_group_open",
    "shard",
    "shard_range",
    "torchrun_rank",
]
