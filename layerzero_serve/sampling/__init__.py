"""Token sampling: per-request parameters, the graph-safe sampler and its step inputs/outputs.

``Sampler.prepare(requests)`` (host, once per step) -> ``SamplingBatch``;
``Sampler.sample(logits, batch)`` (device, graph-safe) -> ``DeviceSample``;
``DeviceSample.to_host()`` (the step's one device-to-host copy) -> ``HostSample``.
"""

from layerzero_serve.sampling._batch import SamplingBatch, SamplingPlan
from layerzero_serve.sampling._outputs import DeviceSample, HostSample, PendingHostSample
from layerzero_serve.sampling._params import SamplingParams
from layerzero_serve.sampling._processors import FAILURE_DETAILS, row_max_and_flags
from layerzero_serve.sampling._prompt_logprobs import any_prompt_logprobs, prompt_logprobs
from layerzero_serve.sampling._sampler import Sampler
from layerzero_serve.sampling._validate import token_ids_in_vocab

__all__ = [
    "DeviceSample",
    "FAILURE_DETAILS",
    "HostSample",
    "PendingHostSample",
    "Sampler",
    "SamplingBatch",
    "SamplingParams",
    "SamplingPlan",
    "any_prompt_logprobs",
    "prompt_logprobs",
    "row_max_and_flags",
    "token_ids_in_vocab",
]
