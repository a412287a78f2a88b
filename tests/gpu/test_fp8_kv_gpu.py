"""FP8 KV cache on a GPU: CUDA graphs captured over the FP8 dispatch (quantize, scaled query
and output, torch decode kernel) replay what eager runs; teacher-forced logprobs within the CPU
test's bound of the bf16-KV engine; the pool holds twice the tokens of bf16 per byte."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU CI
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

from layerzero_serve.engine import Engine  # noqa: E402
from layerzero_serve.sampling import SamplingParams  # noqa: E402

MODEL = "dummy:llama3.2-1b"


def _greedy(eng: Engine, prompts, n: int = 24) -> list[list[int]]:
    sp = SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True)
    for i, p in enumerate(prompts):
        eng.add_request(p, sp, request_id=str(i))
    out: dict[str, list[int]] = {}
    while eng.has_unfinished():
        for o in eng.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
    return [out[str(i)] for i in range(len(prompts))]


def _prompts(vocab: int, k: int = 6):
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, vocab, (20 + 13 * i,), generator=g).tolist() for i in range(k)]


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_graphs_replay_the_eager_fp8_run(kv_dtype):
    common = {"model": MODEL, "dtype": "bfloat16", "num_kv_blocks": 512, "max_num_seqs": 8}
    eager = Engine(**common, kv_cache_dtype=kv_dtype, enforce_eager=True)
    prompts = _prompts(eager.vocab_size)
    want = _greedy(eager, prompts)
    graphs = Engine(**common, kv_cache_dtype=kv_dtype)
    assert graphs.runner.kv_cache.tensors[0].dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    assert _greedy(graphs, prompts) == want
    assert graphs.stats()["kv_cache"]["used"] == 0


def test_fp8_pool_holds_twice_the_bf16_tokens():
    common = {"model": MODEL, "dtype": "bfloat16", "kv_cache_bytes": 256 << 20}
    bf16 = Engine(**common, enforce_eager=True).kv_manager.num_blocks
    fp8 = Engine(**common, kv_cache_dtype="fp8_e4m3", enforce_eager=True).kv_manager.num_blocks
    assert fp8 in (2 * bf16, 2 * bf16 - 1)  # the null block counts once in each
