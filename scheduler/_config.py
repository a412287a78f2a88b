"""Scheduler configuration (frozen, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass

from layerzero_serve.errors import ValidationError, check_int

POLICIES = ("fcfs", "priority")
INT32_MAX = (1 << 31) - 1  # token counts and positions are int32 on the device
MAX_LOOKAHEAD_TOKENS = 1024


def check_admission(enable_chunked_prefill: bool, max_prefill_chunk: int, policy: str) -> None:
    """The admission settings shared by EngineConfig and SchedulerConfig: a prefill chunk
    limit only with chunked prefill, and a known queue policy."""
    if not enable_chunked_prefill and max_prefill_chunk:
        raise ValidationError(
            "max_prefill_chunk",
            max_prefill_chunk,
            "0 when enable_chunked_prefill is False (prompts are then admitted whole)",
        )
    if not isinstance(policy, str) or policy not in POLICIES:
        raise ValidationError("policy", policy, f"one of {POLICIES}")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Budgets and policy of continuous batching.

    Attributes:
        max_num_seqs: requests in one step (sequence budget), in [1, 2**31 - 1].
        max_num_batched_tokens: tokens in one step (token budget), in [1, 2**31 - 1].
        max_model_len: longest sequence (prompt + output) a request may reach, in
            [2, 2**31 - 1].
        enable_chunked_prefill: split long prompts over steps; when off, a prompt is admitted
            only when it fits the remaining token budget whole.
        max_prefill_chunk: cap on tokens one request prefills per step (0 = no cap beyond the
            budget). Useful to interleave prefills and keep decode latency flat.
        policy: ``"fcfs"`` (arrival order) or ``"priority"`` (lower ``Request.priority`` first,
            then arrival). Preemption victims are taken from the other end.
        num_lookahead_tokens: extra KV slots reserved per running request (speculative drafts),
            in [0, 1024].

    CUDA graphs: a host object.
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True
    max_prefill_chunk: int = 0
    policy: str = "fcfs"
    num_lookahead_tokens: int = 0

    def __post_init__(self) -> None:
        for name, low, high in (
            ("max_num_seqs", 1, INT32_MAX),
            ("max_num_batched_tokens", 1, INT32_MAX),
            ("max_model_len", 2, INT32_MAX),
            ("max_prefill_chunk", 0, INT32_MAX),
            ("num_lookahead_tokens", 0, MAX_LOOKAHEAD_TOKENS),
        ):
            object.__setattr__(self, name, check_int(name, getattr(self, name), low, high))
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValidationError("enable_chunked_prefill", self.enable_chunked_prefill, "a bool")
        check_admission(self.enable_chunked_prefill, self.max_prefill_chunk, self.policy)
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValidationError(
                "max_num_batched_tokens",
                self.max_num_batched_tokens,
                f">= max_model_len ({self.max_model_len}) when chunked prefill is off",
            )
