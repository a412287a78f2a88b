"""Scheduler configuration (frozen, validated on construction)."""

from __future__ import annotations

from dataclasses import dataclass

from layerzero_serve.errors import ValidationError

POLICIES = ("fcfs", "priority")


@dataclass(frozen=True, slots=True)
class SchedulerConfig:
    """Budgets and policy of continuous batching.

    Attributes:
        max_num_seqs: requests in one step (sequence budget), >= 1.
        max_num_batched_tokens: tokens in one step (token budget), >= 1.
        max_model_len: longest sequence (prompt + output) a request may reach, >= 2.
        enable_chunked_prefill: split long prompts over steps; when off, a prompt is admitted
            only when it fits the remaining token budget whole.
        max_prefill_chunk: cap on tokens one request prefills per step (0 = no cap beyond the
            budget). Useful to interleave prefills and keep decode latency flat.
        policy: ``"fcfs"`` (arrival order) or ``"priority"`` (lower ``Request.priority`` first,
            then arrival). Preemption victims are taken from the other end.
        num_lookahead_tokens: extra KV slots reserved per running request (speculative drafts).
    """

    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int = 4096
    enable_chunked_prefill: bool = True
    max_prefill_chunk: int = 0
    policy: str = "fcfs"
    num_lookahead_tokens: int = 0

    def __post_init__(self) -> None:
        _int_at_least("max_num_seqs", self.max_num_seqs, 1)
        _int_at_least("max_num_batched_tokens", self.max_num_batched_tokens, 1)
        _int_at_least("max_model_len", self.max_model_len, 2)
        _int_at_least("max_prefill_chunk", self.max_prefill_chunk, 0)
        _int_at_least("num_lookahead_tokens", self.num_lookahead_tokens, 0)
        if not isinstance(self.enable_chunked_prefill, bool):
            raise ValidationError("enable_chunked_prefill", self.enable_chunked_prefill, "a bool")
        if not self.enable_chunked_prefill and self.max_prefill_chunk:
            raise ValidationError(
                "max_prefill_chunk",
                self.max_prefill_chunk,
                "0 when enable_chunked_prefill is False (prompts are then admitted whole)",
            )
        if self.policy not in POLICIES:
            raise ValidationError("policy", self.policy, f"one of {POLICIES}")
        if not self.enable_chunked_prefill and self.max_num_batched_tokens < self.max_model_len:
            raise ValidationError(
                "max_num_batched_tokens",
                self.max_num_batched_tokens,
                f">= max_model_len ({self.max_model_len}) when chunked prefill is off",
            )


def _int_at_least(name: str, value: object, low: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ValidationError(name, value, f"an integer >= {low}")
