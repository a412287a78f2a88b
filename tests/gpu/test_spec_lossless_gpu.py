"""Speculative sampling on CUDA (GPU only): the lossless checks of
tests/unit/test_spec_lossless.py with 10^6 trials per (p, q) pair and 10^6 sequences for the
joint law, for the torch reference, the Triton kernel and (where installed) the FlashInfer
adapter; torch and Triton agree bitwise on the same random inputs; all replay correctly inside a
captured CUDA graph (FlashInfer: equal to its own eager run, since it draws its own randoms)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():  # pragma: no cover - CPU CI
    pytest.skip("needs a CUDA GPU", allow_module_level=True)

pytest.importorskip("triton")

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))

from test_spec_lossless import (  # noqa: E402
    ALPHA,
    joint_draws,
    joint_pvalue,
    single_position_failures,
)

from layerzero_serve.kernels._triton.rejection_sampling import (  # noqa: E402
    triton_rejection_sample,
)
from layerzero_serve.spec_decode._rejection import draw_randoms, rejection_sample  # noqa: E402

TRIALS = 1_000_000
SAMPLERS = {"torch": rejection_sample, "triton": triton_rejection_sample}
try:
    from layerzero_serve.kernels._flashinfer_rejection import FlashInferRejectionSampler

    SAMPLERS["flashinfer"] = FlashInferRejectionSampler()
except ImportError:  # pragma: no cover - FlashInfer not installed
    pass


@pytest.mark.parametrize("impl", sorted(SAMPLERS))
def test_single_position_is_lossless_1e6(impl):
    assert single_position_failures(SAMPLERS[impl], trials=TRIALS, device="cuda") == []


@pytest.mark.parametrize("greedy_draft", [False, True])
@pytest.mark.parametrize("impl", sorted(SAMPLERS))
def test_joint_law_is_lossless_1e6(impl, greedy_draft):
    emitted = joint_draws(SAMPLERS[impl], TRIALS, device="cuda", greedy_draft=greedy_draft)
    assert (emitted >= 0).all()
    assert joint_pvalue(emitted) > ALPHA


def _inputs(b=64, k=4, v=50_000, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    target = torch.rand(b, k + 1, v, generator=gen, device="cuda") ** 8
    target /= target.sum(-1, keepdim=True)
    draft = (0.5 * target[:, :k] + 0.5 / v).contiguous()
    ids = torch.multinomial(draft.reshape(-1, v), 1, generator=gen).reshape(b, k)
    ids[0, 1], ids[1, 0] = v, v + 1000  # out of vocabulary: rejected, never gathered
    num_drafts = torch.randint(0, k + 1, (b,), generator=gen, device="cuda").int()
    greedy = torch.rand(b, generator=gen, device="cuda") < 0.25
    uniforms, noise = draw_randoms(b, k, v, generator=gen)
    return ids, draft, target, uniforms, noise, num_drafts, greedy


@pytest.mark.parametrize("with_q", [True, False])
def test_triton_equals_torch_bitwise_on_cuda(with_q):
    ids, draft, target, u, noise, nd, greedy = _inputs()
    q = draft if with_q else None
    ref = rejection_sample(ids, q, target, u, noise, nd, greedy)
    out = triton_rejection_sample(ids, q, target, u, noise, nd, greedy)
    assert torch.equal(ref[0], out[0]) and torch.equal(ref[1], out[1])


@pytest.mark.parametrize("impl", sorted(SAMPLERS))
def test_replays_inside_a_cuda_graph(impl):
    fn = SAMPLERS[impl]
    static = list(_inputs(seed=1))
    fn(*static)  # warm-up: compile / allocate outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out_ids, num_acc = fn(*static)
    for seed in (2, 3):
        fresh = _inputs(seed=seed)
        for dst, src in zip(static, fresh, strict=True):
            dst.copy_(src)
        graph.replay()
        ref = (fn if impl == "flashinfer" else rejection_sample)(*fresh)
        assert torch.equal(out_ids, ref[0]) and torch.equal(num_acc, ref[1])


@pytest.mark.skipif("flashinfer" not in SAMPLERS, reason="FlashInfer is not installed")
def test_flashinfer_greedy_rows_equal_the_reference():
    ids, draft, target, u, noise, nd, greedy = _inputs(seed=4)
    hits = torch.rand(ids.shape, device="cuda") < 0.5
    ids = torch.where(hits & (ids < target.shape[2]), target[:, :-1].argmax(-1), ids)
    for q in (draft, None):
        ref = rejection_sample(ids, q, target, u, noise, nd, greedy)
        out = SAMPLERS["flashinfer"](ids, q, target, u, noise, nd, greedy)
        assert torch.equal(out[0][greedy], ref[0][greedy])
        assert torch.equal(out[1][greedy], ref[1][greedy])
        assert bool((out[1] <= nd).all())
