"""The from-logits Triton sampler (exact top-K candidates, then filters and the draw on them)
against the torch kernel on ``softmax(logits / T)`` and the float64 reference. Interpreted on
the CPU (the candidates come from K max-extractions there; ``tl.topk`` / ``tl.sort`` on a GPU,
whose compile for sm_80 / sm_90 is checked below), native on a GPU."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")
sys.path.insert(0, str(Path(__file__).parents[1] / "unit"))
sys.path.insert(0, str(Path(__file__).parent))

from aot_compile import run_compile_script  # noqa: E402
from test_sampling_reference import filtered_probs, gof_pvalue  # noqa: E402
from test_triton_sampling import ALPHA_PER_CASE, CASES, _case_logits  # noqa: E402

from layerzero_serve.kernels._catalog import all_specs  # noqa: E402
from layerzero_serve.kernels._triton.topk_sampling import (  # noqa: E402
    TritonTopKSamplingKernel,
    triton_sample_logits,
)
from layerzero_serve.kernels.sampling_api import TorchSamplingKernel, filter_weights  # noqa: E402
from layerzero_serve.kernels.spec import KernelContext, Op  # noqa: E402
from layerzero_serve.sampling import Sampler, SamplingParams  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _case(rng, n, vocab, ties=False):
    logits = torch.from_numpy(rng.normal(0, 2.0, (n, vocab)).astype(np.float32))
    if ties:  # equal logits at the top, straddling the cuts (as bf16 logits often are)
        logits[:, : min(12, vocab)] = 3.0
        logits[:, 12 : min(20, vocab)] = 2.0
    temp = torch.from_numpy(rng.choice([0.5, 1.0, 1.7], n)).float()
    top_k = torch.from_numpy(rng.choice([vocab, 1, 2, 5, 13, 50, 64, 65, vocab - 1], n)).int()
    top_p = torch.from_numpy(rng.choice([1.0, 0.2, 0.5, 0.9, 0.99], n)).float()
    min_p = torch.from_numpy(rng.choice([0.0, 0.0, 0.05, 0.3], n)).float()
    seed = torch.from_numpy(rng.integers(-(2**62), 2**62, n))
    offset = torch.from_numpy(rng.integers(0, 1000, n))
    return tuple(t.to(DEVICE) for t in (logits, temp, top_k.clamp(1, vocab), top_p, min_p, seed,
                                        offset))  # fmt: skip


def _reference(logits, temp, top_k, top_p, min_p, seed, offset):
    probs = torch.softmax(logits / temp[:, None], -1)
    args = (probs, top_k, top_p, min_p, seed, offset)
    return TorchSamplingKernel().sample(*args), filter_weights(*args[:4]) > 0


_PATHS = [(64, 1024, True), (4, 1024, True), (64, 64, True), (4, 1024, False)]


def _path_cases():
    """Every path at every vocabulary; at 5000 (slow in the interpreter, and no new path) the
    split path once and the streaming fallback once."""
    for vocab in (2, 32, 257, 1000, 5000):
        for ties in (False, True):
            for path in _PATHS:
                if vocab == 5000 and path not in (_PATHS[1], _PATHS[3]) and DEVICE == "cpu":
                    continue
                yield (vocab, ties, *path)


@pytest.mark.parametrize(("vocab", "ties", "num_candidates", "capacity", "split"), _path_cases())
def test_same_tokens_as_the_torch_kernel(vocab, ties, num_candidates, capacity, split):
    """Every path: with 64 candidates most rows decide on them; with 4, rows with top-k > 4
    go through the split path (or, ``split=False``, stream the row in one program); with 64
    slots, rows whose candidate list overflows (every logit, below 64 chunks) go there too."""
    rng = np.random.default_rng(vocab + 10 * ties + num_candidates + capacity)
    rows = 256 if vocab < 5000 else 64
    if split and DEVICE == "cpu":  # the interpreter runs the split path's programs one by one
        rows //= 2 if vocab < 1000 else 4
    args = _case(rng, rows, vocab, ties)
    got = triton_sample_logits(*args, num_candidates=num_candidates, capacity=capacity, split=split)
    ref, kept = _reference(*args)
    assert got.dtype == torch.int64 and got.shape == ref.shape
    assert kept.gather(1, got[:, None]).all(), "a token outside the kept set"
    # same (seed, offset) -> same token, up to float summation order at a CDF boundary
    assert (got != ref).sum() <= 2, (got != ref).nonzero().flatten().tolist()


@pytest.mark.parametrize(
    "hints",
    [
        dict(candidates=False, top_k_search=False, top_p_search=False),
        dict(top_k_search=False),
        dict(top_p_search=False),
    ],
)
def test_wrong_launch_hints_cost_speed_never_tokens(hints):
    """Hints promise what no row needs; here they lie (rows with top-k and top-p): the rows
    whose search is not launched stream in their program and draw the same tokens."""
    rng = np.random.default_rng(7)
    args = _case(rng, 16, 400, ties=True)
    want = triton_sample_logits(*args, num_candidates=4, split=True)
    got = triton_sample_logits(*args, num_candidates=4, split=True, **hints)
    assert torch.equal(got, want)


def test_the_gpu_sort_paths_draw_the_same_tokens(monkeypatch):
    """METHOD 1 (``tl.sort`` for the candidates and for the id-ordered CDF, what a GPU without
    ``tl.topk`` runs; with it only the candidate selection differs) forced here, where the
    interpreter would take the pairwise path: the same tokens as the torch kernel."""
    from layerzero_serve.kernels._triton import topk_launch
    from layerzero_serve.kernels._triton import topk_sampling as m

    plan = m._launch_plan

    def sort_plan(*a, **k):
        p = plan(*a, **k)
        return topk_launch._LaunchPlan(p.chunk, p.num_chunks, p.ns, p.use_tau, p.block_b,
                                       p.grid_b, 1, p.warps, p.split, p.block_v,
                                       p.iters)  # fmt: skip

    monkeypatch.setattr(m, "_launch_plan", sort_plan)
    rng = np.random.default_rng(11)
    args = _case(rng, 12, 300, ties=True)
    got = triton_sample_logits(*args, num_candidates=16, capacity=64, split=True)
    ref, kept = _reference(*args)
    assert kept.gather(1, got[:, None]).all()
    assert (got != ref).sum() <= 1, (got != ref).nonzero().flatten().tolist()


@pytest.mark.parametrize("vocab", [32000, 151936])
def test_vocabularies_that_are_not_a_block_multiple(vocab):
    rng = np.random.default_rng(vocab)
    logits = torch.from_numpy(rng.normal(0, 3, (4, vocab)).astype(np.float32))
    logits[3] = float("-inf")
    logits[3, vocab - 1] = 0.0  # all the mass on the last id (in the masked tail chunk)
    logits[2, vocab - 2] = 40.0  # a peak near the end: top-p 0.9 closes on it
    args = (
        logits.to(DEVICE),
        torch.tensor([1.0, 0.7, 1.0, 1.0], device=DEVICE),
        torch.tensor([50, vocab, vocab, 50], dtype=torch.int32, device=DEVICE),
        torch.tensor([0.9, 0.95, 0.9, 0.9], device=DEVICE),
        torch.zeros(4, device=DEVICE),
        torch.tensor([1, 2, 3, 4], device=DEVICE),
        torch.tensor([0, 5, 9, 1], device=DEVICE),
    )
    got = triton_sample_logits(*args, chunk=4096)
    assert torch.equal(got, _reference(*args)[0])
    assert int(got[2]) == vocab - 2 and int(got[3]) == vocab - 1


@pytest.mark.parametrize("split", [False, True])
@pytest.mark.parametrize("case", list(CASES))
def test_goodness_of_fit(case, split):
    """Both fallbacks for the rows the candidates cannot decide (fewer draws under the
    interpreter, which runs its programs one by one: an eighth for the split path, half for
    one program per row; on a GPU every case draws its full count)."""
    kw, which, n = CASES[case]
    if DEVICE == "cpu":
        n = n // 8 if split else n // 2
    logits = _case_logits(which)
    vocab = logits.shape[0]
    full = lambda v, dt: torch.full((n,), v, dtype=dt, device=DEVICE)  # noqa: E731
    tokens = triton_sample_logits(
        torch.from_numpy(logits)[None].repeat(n, 1).to(DEVICE),
        full(kw.get("temperature", 1.0), torch.float32),
        full(kw.get("top_k", vocab), torch.int32),
        full(kw.get("top_p", 1.0), torch.float32),
        full(kw.get("min_p", 0.0), torch.float32),
        torch.arange(n, device=DEVICE) * 7 + 3,
        full(11, torch.int64),
        split=split,
    )
    counts = np.bincount(tokens.cpu().numpy(), minlength=vocab)
    ref = filtered_probs(logits, **kw)
    assert counts[ref == 0].sum() == 0
    assert gof_pvalue(counts, ref) > ALPHA_PER_CASE


def test_degenerate_rows_do_not_move_the_others():
    """Through the sampler: a NaN row and an all -inf row fail; every other row's token is the
    one it gets in a batch without them."""
    kernel = TritonTopKSamplingKernel()
    rng = np.random.default_rng(3)
    logits = torch.from_numpy(rng.normal(0, 1, (6, 300)).astype(np.float32)).to(DEVICE)
    params = [SamplingParams(top_k=20, top_p=0.9, seed=i) for i in range(6)]
    clean = Sampler(seed=0, kernel=kernel)(logits[[0, 2, 3, 5]], [params[i] for i in (0, 2, 3, 5)])
    bad = logits.clone()
    bad[1, 7] = float("nan")
    bad[4] = float("-inf")
    res = Sampler(seed=0, kernel=kernel)(bad, params)
    assert set(res.failed) == {1, 4}
    assert [res.tokens[i] for i in (0, 2, 3, 5)] == clean.tokens


def test_in_the_catalog_and_through_the_sampler():
    spec = next(s for s in all_specs() if s.name == "triton.topk_sampling")
    assert spec.op == Op.SAMPLING and spec.graph_safe and spec.backend == "triton"
    kernel = spec.factory(KernelContext(Op.SAMPLING, vocab_size=500))
    assert isinstance(kernel, TritonTopKSamplingKernel) and kernel.position_invariant
    rng = np.random.default_rng(0)
    logits = torch.from_numpy(rng.normal(0, 1.5, (16, 500)).astype(np.float32)).to(DEVICE)
    params = [
        SamplingParams(temperature=float(rng.choice([0.6, 1.0, 1.4])), top_k=int(k), top_p=0.9)
        for k in rng.integers(1, 80, 16)
    ]
    params[0] = SamplingParams(top_k=20, top_p=0.8, seed=42)
    params[5] = SamplingParams(temperature=0.0)  # a greedy row in a sampled batch
    params[7] = SamplingParams(min_p=0.2, seed=5)  # no top-k / top-p: streams the row
    seeds = list(range(100, 116))
    ours = Sampler(seed=0, kernel=kernel)(logits, params, seeds=seeds).tokens
    torch_ = Sampler(seed=0, kernel=TorchSamplingKernel())(logits, params, seeds=seeds).tokens
    assert sum(a != b for a, b in zip(ours, torch_, strict=True)) <= 1
    assert ours[5] == int(logits[5].argmax())
    # a seeded row gives the same token at any batch position
    sampler = Sampler(seed=0, kernel=kernel)
    alone = sampler(logits[:1], params[:1]).tokens[0]
    for pos in (3, 15):
        perm = list(range(1, 16))
        perm.insert(pos, 0)
        assert sampler(logits[perm], [params[i] for i in perm]).tokens[pos] == alone


_COMPILE = """
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from layerzero_serve.kernels._triton import topk_sampling as m
built = m._kernels()
t = lambda names, ty: {n: ty for n in names.split()}
sigs = {
    "chunk_stats": {**t("x_ptr temp_ptr cmax_ptr csum_ptr", "*fp32"), "count_ptr": "*i32",
                    **t("stride_b B V S", "i32"), **t("BLOCK_B CHUNK", "constexpr")},
    "threshold": {**t("cmax_ptr tau_ptr", "*fp32"), **t("B S", "i32"),
                  **t("BLOCK_B NS K METHOD", "constexpr")},
    "compact": {**t("x_ptr tau_ptr", "*fp32"), "count_ptr": "*i32", "cand_ptr": "*i64",
                **t("stride_b B V CAP", "i32"), **t("BLOCK_B CHUNK USE_TAU", "constexpr")},
    "draw": {**t("x_ptr temp_ptr top_p_ptr min_p_ptr cmax_ptr csum_ptr", "*fp32"),
             **t("top_k_ptr count_ptr ist_ptr", "*i32"), "fst_ptr": "*fp32",
             **t("seed_ptr offset_ptr cand_ptr out_ptr", "*i64"), **t("stride_b B V S", "i32"),
             **t("BLOCK_B CAP NS K METHOD BLOCK_V SPLIT ITERS DEFER CANDS", "constexpr"),
             **t("TOPK_SEARCH TOPP_SEARCH", "constexpr")},
}
split = m.split_sampling._kernels()
split_sigs = {
    "search": {**t("x_ptr temp_ptr cmax_ptr fst_ptr part_m_ptr", "*fp32"),
               **t("top_k_ptr ist_ptr part_c_ptr ticket_ptr", "*i32"),
               **t("stride_b B V S SC", "i32"),
               **t("STAGE LAST BLOCK_B CHUNK SUB P NS NSC", "constexpr")},
    "finish": {**t("x_ptr temp_ptr min_p_ptr cmax_ptr fst_ptr cm_ptr", "*fp32"),
               **t("ist_ptr ek_ptr ep_ptr ticket_ptr", "*i32"),
               **t("seed_ptr offset_ptr out_ptr", "*i64"), **t("stride_b B V S SC", "i32"),
               **t("BLOCK_B CHUNK SUB NS NSC", "constexpr")},
}
split_consts = [
    ("search", dict(STAGE=0, LAST=False, BLOCK_B=1, CHUNK=2048, SUB=64, P=64, NS=64, NSC=512)),
    ("search", dict(STAGE=0, LAST=True, BLOCK_B=1, CHUNK=2048, SUB=64, P=64, NS=64, NSC=512)),
    ("search", dict(STAGE=1, LAST=True, BLOCK_B=1, CHUNK=2048, SUB=64, P=64, NS=64, NSC=512)),
    ("finish", dict(BLOCK_B=1, CHUNK=2048, SUB=64, NS=64, NSC=512)),
]
for cc in (80, 90):
    for name, consts in split_consts:
        src = ASTSource(fn=split[name], signature=split_sigs[name], constexprs=consts)
        try:
            triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": 4})
        except Exception as e:
            if "ptxas" in str(e).lower():
                sys.exit(77)
            raise
for method, defer in (((0, True), (1, False)) if built["has_topk"] else ((1, True),)):
    consts = {
        "chunk_stats": dict(BLOCK_B=1, CHUNK=1024),
        "threshold": dict(BLOCK_B=1, NS=512, K=256, METHOD=method),
        "compact": dict(BLOCK_B=1, CHUNK=1024, USE_TAU=True),
        "draw": dict(BLOCK_B=1, CAP=1024, NS=512, K=256, METHOD=method, BLOCK_V=1024, SPLIT=8,
                     ITERS=11, DEFER=defer, CANDS=defer, TOPK_SEARCH=defer, TOPP_SEARCH=True),
    }
    for cc in (80, 90):
        for name, sig in sigs.items():
            src = ASTSource(fn=built[name], signature=sig, constexprs=consts[name])
            try:
                triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": 8})
            except Exception as e:
                if "ptxas" in str(e).lower():
                    sys.exit(77)
                raise
"""


def test_compiles_for_cuda_targets_without_a_gpu():
    """Both candidate methods (tl.topk where this Triton has it, tl.sort otherwise) compile for
    sm_80 / sm_90 on any machine; the interpreter runs a third one."""
    run_compile_script(_COMPILE)
