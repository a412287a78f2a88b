"""Model runner: inputs from a schedule, the attention interface, forward and sampling.

Public modules: ``attention`` (the attention interface) and ``cuda_graph`` (capture and replay
per bucket). The names below are what the engine, the draft model and async scheduling build
on; everything in the ``_``-modules is internal.
"""

from layerzero_serve.runner._async_decode import PendingDecode, collect_decode, launch_decode
from layerzero_serve.runner._cpu_threads import MAX_CPU_THREADS, choose_cpu_threads
from layerzero_serve.runner._input_batch import HostBatch, batch_from_host
from layerzero_serve.runner._memory import measure_graph_memory
from layerzero_serve.runner._model_runner import ModelRunner
from layerzero_serve.runner._optimize import optimize_model
from layerzero_serve.runner._stack import prepare_model

__all__ = [
    "MAX_CPU_THREADS",
    "HostBatch",
    "ModelRunner",
    "PendingDecode",
    "batch_from_host",
    "choose_cpu_threads",
    "collect_decode",
    "launch_decode",
    "measure_graph_memory",
    "optimize_model",
    "prepare_model",
]
