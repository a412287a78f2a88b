"""Token sampling: per-request parameters and the reference sampler."""

from layerzero_serve.sampling.params import SamplingParams
from layerzero_serve.sampling.sampler import Sampler

__all__ = ["Sampler", "SamplingParams"]
