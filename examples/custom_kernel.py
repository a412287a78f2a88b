"""Register your own decode-attention kernel with the selection engine, see where it wins and
why it loses elsewhere, then generate with it.

The kernel here is a plain PyTorch decode (one query token per sequence over the paged cache)
declared for head_dim 32 only; on a GPU the same steps register a Triton kernel. Runs on the
CPU (``python examples/custom_kernel.py``) in a few seconds.
"""

from __future__ import annotations

from layerzero_serve import LLM, SamplingParams
from layerzero_serve.kernels import torch_ref
from layerzero_serve.selection import (
    KernelContext,
    KernelSpec,
    Op,
    explain,
    get_selector,
    register_backend,
    register_kernel,
)


class MyDecode:
    """plan / write_kv / run: the contract of ``kernels.attention_api.PagedAttentionImpl``.
    Shapes: query ``[S, Hq, D]``, one layer's cache ``[num_blocks, 2, block_size, Hkv, D]``."""

    name = "mine.decode"
    calls = 0

    def __init__(self, ctx: KernelContext) -> None:
        self.ctx = ctx

    def plan(self, meta) -> None:  # host work once per step (nothing to do here)
        pass

    def write_kv(self, key, value, kv_cache, meta) -> None:
        torch_ref.write_kv(key, value, kv_cache, meta.slot_mapping)

    def run(self, query, kv_cache, meta):
        MyDecode.calls += 1
        return torch_ref.paged_decode(query, kv_cache, meta.block_tables, meta.seq_lens)


SPEC = KernelSpec(
    "mine.decode",
    Op.ATTN_DECODE,
    backend="mine",
    priority=500,  # above every built-in decode kernel where it can run
    graph_safe=True,
    device_types=frozenset({"cpu", "cuda"}),
    head_dims=frozenset({32}),  # a true constraint: it is only validated for this head size
    factory=MyDecode,
    doc="examples/custom_kernel.py",
)


def main() -> dict:
    register_backend("mine", version="0.1")
    register_kernel(SPEC, replace=True)

    cpu = dict(device_type="cpu", sm=0, generation="cpu", dtype="float32", num_q_heads=4)
    where_it_wins = KernelContext(Op.ATTN_DECODE, head_dim=32, num_kv_heads=2, **cpu)
    where_it_loses = KernelContext(Op.ATTN_DECODE, head_dim=128, num_kv_heads=2, **cpu)
    wins, loses = explain(where_it_wins), explain(where_it_loses)
    print(wins.text())
    print(loses.text())

    # The embedded default model has head_dim 32: the engine's decode plan picks our kernel.
    prompts = ["The paged cache", "A kernel of my own"]
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm = LLM(device="cpu")
    mine = [r.token_ids for r in llm.generate(prompts, params, use_tqdm=False)]
    chosen = llm.engine.stats()["kernels"]["attention_decode"]
    print(f"decode kernel in the engine: {chosen}, run {MyDecode.calls} times")

    get_selector().unregister("mine.decode")  # back to the built-in kernels
    ref_llm = LLM(device="cpu")
    ref = [r.token_ids for r in ref_llm.generate(prompts, params, use_tqdm=False)]
    print("same tokens as the built-in decode:", mine == ref)
    loser = next(c for c in loses.choice.candidates if c.name == "mine.decode")
    return {
        "chosen_where_it_fits": wins.choice.spec.name,
        "chosen_elsewhere": loses.choice.spec.name,
        "why_it_lost": loser.rejection.code.value,
        "engine_decode": chosen,
        "calls": MyDecode.calls,
        "tokens": mine,
        "reference_tokens": ref,
    }


if __name__ == "__main__":
    main()
