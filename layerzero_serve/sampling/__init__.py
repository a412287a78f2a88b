"""Token sampling: per-request parameters, the graph-safe sampler and its step inputs/outputs.

``Sampler.prepare(requests)`` (host, once per step) -> ``SamplingBatch``;
``Sampler.sample(logits, batch)`` (device, graph-safe) -> ``DeviceSample``;
``DeviceSample.to_host()`` (the step's one device-to-host copy) -> ``HostSample``.
"""

from layerzero_serve.sampling._batch import SamplingBatch, SamplingPlan
from layerzero_serve.sampling._outputs import DeviceSample, HostSample
from layerzero_serve.sampling._params import SamplingParams
from layerzero_serve.sampling._sampler import Sampler

__all__ = [
    "DeviceSample",
    "HostSample",
    "Sampler",
    "SamplingBatch",
    "SamplingParams",
    "SamplingPlan",
]
