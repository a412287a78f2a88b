"""Every attention adapter available on this machine against the torch reference (GPU), and
unavailable ones reported with their probe's reason. Includes FlashInfer decode in CUDA-graph
mode (captured once, replayed after re-planning with new lengths) and Liger's layer ops."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from layerzero_serve.kernels import torch_ref
from layerzero_serve.kernels._backends import probe_backend
from layerzero_serve.kernels._catalog import all_specs
from layerzero_serve.kernels._torch_backend import TorchPagedAttention
from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kernels.spec import KernelContext, Op

pytestmark = pytest.mark.gpu
TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _need(backend: str) -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    st = probe_backend(backend)
    if not st.available:
        pytest.skip(f"{backend} unavailable: {st.reason}")


def _batch(rng, q_lens, kv_lens, bs, hkv, d, dtype, num_blocks=None):
    """A scattered paged cache holding kv_lens tokens per sequence, and metadata for a step
    whose queries are the last q_lens positions of each sequence."""
    need = sum(-(-int(n) // bs) for n in kv_lens)
    num_blocks = num_blocks or need + 8
    cache = torch.randn(num_blocks, 2, bs, hkv, d, dtype=dtype, device="cuda")
    free = rng.permutation(np.arange(1, num_blocks))
    width = max(-(-int(n) // bs) for n in kv_lens)
    table = np.zeros((len(kv_lens), width), np.int32)
    used = 0
    for i, n in enumerate(kv_lens):
        nb = -(-int(n) // bs)
        table[i, :nb] = free[used : used + nb]
        used += nb
    qsl = np.concatenate([[0], np.cumsum(q_lens)]).astype(np.int32)
    slots = []
    for i, (q, n) in enumerate(zip(q_lens, kv_lens, strict=True)):
        pos = np.arange(n - q, n)
        slots.append(table[i, pos // bs].astype(np.int64) * bs + pos % bs)
    meta = AttentionMetadata(
        num_seqs=len(kv_lens),
        num_tokens=int(qsl[-1]),
        block_size=bs,
        query_start_loc=torch.from_numpy(qsl).cuda(),
        seq_lens=torch.tensor(kv_lens, dtype=torch.int32, device="cuda"),
        block_tables=torch.from_numpy(table).cuda(),
        slot_mapping=torch.from_numpy(np.concatenate(slots).astype(np.int32)).cuda(),
        max_query_len=int(max(q_lens)),
        max_seq_len=int(max(kv_lens)),
        query_start_loc_cpu=qsl.tolist(),
        seq_lens_cpu=[int(n) for n in kv_lens],
        block_tables_cpu=table,
    )
    return cache, meta


def _ctx(op, b, hq, hkv, d, bs, dtype, graph=False):
    return KernelContext(
        op,
        dtype=str(dtype).removeprefix("torch."),
        head_dim=d,
        num_q_heads=hq,
        num_kv_heads=hkv,
        block_size=bs,
        batch_bucket=b,
        q_len=1 if op == Op.ATTN_DECODE else 0,
        graph_mode=graph,
    )


def _check(impl, cache, meta, hq, d, dtype, rng):
    t = meta.num_tokens
    hkv = cache.shape[3]
    q = torch.randn(t, hq, d, dtype=dtype, device="cuda")
    k = torch.randn(t, hkv, d, dtype=dtype, device="cuda")
    v = torch.randn(t, hkv, d, dtype=dtype, device="cuda")
    ref_cache = cache.clone()
    torch_ref.write_kv(k, v, ref_cache, meta.slot_mapping)
    ref = torch_ref.paged_attention(q, ref_cache, meta)
    impl.plan(meta)
    impl.write_kv(k, v, cache, meta)
    out = impl.run(q, cache, meta)
    assert torch.equal(cache, ref_cache)
    torch.testing.assert_close(out.float(), ref.float(), atol=TOL[dtype], rtol=TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bs", [1, 16])
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_flashinfer_decode_matches_reference(dtype, bs, gqa, batch):
    _need("flashinfer")
    from layerzero_serve.kernels._flashinfer_backend import FlashInferDecode

    rng = np.random.default_rng(batch * 100 + gqa * 10 + bs)
    hkv, d = 2 if gqa > 1 else 8, 128
    kv_lens = rng.integers(1, 4097 if batch <= 7 else 1025, size=batch)
    kv_lens[0] = 1
    cache, meta = _batch(rng, [1] * batch, kv_lens, bs, hkv, d, dtype)
    impl = FlashInferDecode(_ctx(Op.ATTN_DECODE, batch, hkv * gqa, hkv, d, bs, dtype))
    _check(impl, cache, meta, hkv * gqa, d, dtype, rng)


# fp16 prefill is not among the prebuilt FlashInfer kernels of the GPU bundle: it JIT-compiles
# once (about 100 s), so it gets one case.
@pytest.mark.parametrize(
    "dtype,bs,gqa,kind",
    [
        (torch.bfloat16, bs, gqa, kind)
        for bs in (1, 16)
        for gqa in (1, 4)
        for kind in ("prefill", "extend", "mixed")
    ]
    + [(torch.float16, 16, 4, "mixed")],
)
def test_flashinfer_prefill_matches_reference(dtype, bs, gqa, kind):
    _need("flashinfer")
    from layerzero_serve.kernels._flashinfer_backend import FlashInferPrefill

    d, hkv = 128, 2
    rng = np.random.default_rng(hash((bs, gqa, kind)) % 2**32)
    kv_lens = np.array([37, 300, 1025, 16])
    if kind == "prefill":
        q_lens = kv_lens.copy()
    elif kind == "extend":  # a cached prefix, then a chunk
        q_lens = np.array([5, 64, 100, 16])
    else:  # decode rows and prefill chunks together
        q_lens = np.array([1, 64, 1, 16])
    cache, meta = _batch(rng, q_lens, kv_lens, bs, hkv, d, dtype)
    impl = FlashInferPrefill(_ctx(Op.ATTN_PREFILL, 4, hkv * gqa, hkv, d, bs, dtype))
    _check(impl, cache, meta, hkv * gqa, d, dtype, rng)


def test_flashinfer_decode_graph_replay_matches_eager():
    _need("flashinfer")
    from layerzero_serve.kernels._flashinfer_backend import FlashInferDecode

    dtype, d, hkv, hq, bs, b = torch.bfloat16, 128, 2, 8, 16, 8
    rng = np.random.default_rng(5)
    cache, meta = _batch(rng, [1] * b, [2048] * b, bs, hkv, d, dtype, num_blocks=b * 128 + 8)
    impl = FlashInferDecode(_ctx(Op.ATTN_DECODE, b, hq, hkv, d, bs, dtype, graph=True))
    q = torch.randn(b, hq, d, dtype=dtype, device="cuda")
    impl.plan(meta)
    impl.run(q, cache, meta)  # warm-up
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = impl.run(q, cache, meta)
    for trial in range(5):  # new lengths each time: re-plan, then replay
        lens = rng.integers(1, 2049, size=b)
        meta.seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        meta.seq_lens_cpu = lens.tolist()
        meta.max_seq_len = int(lens.max())
        impl.plan(meta)
        q.copy_(torch.randn_like(q))
        g.replay()
        eager = impl.run(q.clone(), cache, meta)
        assert torch.equal(out, eager), f"trial {trial}"
        ref = torch_ref.paged_decode(q, cache, meta.block_tables, meta.seq_lens)
        torch.testing.assert_close(out.float(), ref.float(), atol=2e-2, rtol=2e-2)


def test_torch_adapter_on_gpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    rng = np.random.default_rng(9)
    cache, meta = _batch(rng, [1, 1, 1], [5, 17, 300], 16, 2, 128, torch.bfloat16)
    impl = TorchPagedAttention(_ctx(Op.ATTN_DECODE, 3, 8, 2, 128, 16, torch.bfloat16))
    _check(impl, cache, meta, 8, 128, torch.bfloat16, rng)


@pytest.mark.parametrize("backend", ["flash_attn", "xformers"])
def test_unavailable_adapters_report_a_reason(backend):
    st = probe_backend(backend)
    if st.available:
        pytest.skip(f"{backend} is available here: covered by its own tests")
    assert st.reason  # e.g. "import failed: ModuleNotFoundError" or the xformers extension
    specs = [s for s in all_specs() if s.backend == backend]
    assert specs and all(s.factory is not None for s in specs)


def test_liger_ops_match_torch():
    _need("liger_kernel")
    from layerzero_serve.kernels._liger_backend import LigerRMSNorm, LigerRoPE, LigerSwiGLU

    torch.manual_seed(0)
    x = torch.randn(37, 512, dtype=torch.bfloat16, device="cuda")
    w = torch.randn(512, dtype=torch.bfloat16, device="cuda")
    ref = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5)).to(
        torch.bfloat16
    ) * w
    torch.testing.assert_close(LigerRMSNorm()(x, w, 1e-5), ref, atol=2e-2, rtol=2e-2)
    g, u = torch.randn(2, 37, 1024, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(
        LigerSwiGLU()(g, u), torch.nn.functional.silu(g) * u, atol=2e-2, rtol=2e-2
    )
    q = torch.randn(37, 8, 128, dtype=torch.bfloat16, device="cuda")
    k = torch.randn(37, 2, 128, dtype=torch.bfloat16, device="cuda")
    pos = torch.arange(37, device="cuda").float()
    inv = 1.0 / (10000 ** (torch.arange(0, 128, 2, device="cuda").float() / 128))
    ang = torch.cat([pos[:, None] * inv] * 2, -1)
    cos, sin = ang.cos().to(torch.bfloat16), ang.sin().to(torch.bfloat16)

    def rot(t):
        h = t.shape[-1] // 2
        return torch.cat([-t[..., h:], t[..., :h]], -1)

    q2, k2 = LigerRoPE()(q.clone(), k.clone(), cos, sin)
    torch.testing.assert_close(q2, q * cos[:, None] + rot(q) * sin[:, None], atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(k2, k * cos[:, None] + rot(k) * sin[:, None], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bs", [1, 16])
def test_flashinfer_append_kv_writes_what_the_torch_scatter_writes(dtype, bs):
    """Mixed step (prefill, extend, decodes) plus trailing padding tokens: the cache after the
    FlashInfer append is bitwise the cache after the reference scatter."""
    _need("flashinfer")
    from layerzero_serve.kernels._flashinfer_backend import FlashInferKVAppend

    rng = np.random.default_rng(bs)
    q_lens, kv_lens = [37, 5, 1, 1, 1], [37, 300, 1, 4096, 17]
    cache, meta = _batch(rng, q_lens, kv_lens, bs, 8, 128, dtype)
    pad = 3  # padding tokens beyond the last sequence: slot -1, never written
    meta.slot_mapping = torch.cat([meta.slot_mapping, meta.slot_mapping.new_full((pad,), -1)])
    meta.num_tokens += pad
    t = meta.num_tokens
    k = torch.randn(t, 8, 128, dtype=dtype, device="cuda")
    v = torch.randn(t, 8, 128, dtype=dtype, device="cuda")
    ref = cache.clone()
    torch_ref.write_kv(k, v, ref, meta.slot_mapping)
    w = FlashInferKVAppend(_ctx(Op.KV_WRITE, 5, 32, 8, 128, bs, dtype))
    w.plan(meta)
    w.write(k, v, cache, meta)
    assert torch.equal(cache, ref)


def _filtered(p: np.ndarray, k: int, top_p: float, min_p: float) -> np.ndarray:
    """float64 reference: top-k -> top-p over the renormalised kept set -> min-p."""
    order = np.argsort(-p, kind="stable")
    sp = p[order]
    keep = np.arange(len(p)) < k
    kept = np.where(keep, sp, 0.0)
    kept /= kept.sum()
    before = np.concatenate([[0.0], np.cumsum(kept)[:-1]])
    keep &= before < top_p
    keep &= sp >= min_p * sp[0]
    out = np.zeros_like(p)
    out[order] = np.where(keep, sp, 0.0)
    return out / out.sum()


@pytest.mark.parametrize(
    ("k", "top_p", "min_p"), [(257, 1.0, 0.0), (20, 1.0, 0.0), (257, 0.7, 0.0), (30, 0.8, 0.05)]
)
def test_flashinfer_sampling_matches_the_filtered_distribution(k, top_p, min_p):
    """10^6 draws (graph-safe seed/offset tensors, offset advanced per call) against the exact
    float64 filtered distribution: chi-square, and no draw outside the kept set."""
    _need("flashinfer")
    from scipy.stats import chisquare

    from layerzero_serve.kernels._flashinfer_backend import FlashInferSampling

    rng = np.random.default_rng(k)
    vocab, rows, calls = 257, 20000, 50
    p = rng.dirichlet(np.full(vocab, 0.3))
    want = _filtered(p, k, top_p, min_p)
    s = FlashInferSampling(None)
    probs = torch.tensor(p, dtype=torch.float32, device="cuda").expand(rows, vocab).contiguous()
    full = dict(dtype=torch.float32, device="cuda")
    top_k = torch.full((rows,), k, dtype=torch.int32, device="cuda")
    tp, mp = torch.full((rows,), top_p, **full), torch.full((rows,), min_p, **full)
    seed = torch.arange(rows, dtype=torch.int64, device="cuda") + 1234
    counts = torch.zeros(vocab, dtype=torch.int64, device="cuda")
    for step in range(calls):
        offset = torch.full((rows,), step * 16, dtype=torch.int64, device="cuda")
        counts += torch.bincount(s.sample(probs, top_k, tp, mp, seed, offset), minlength=vocab)
    counts = counts.cpu().numpy()
    allowed = want > 0
    assert counts[~allowed].sum() == 0
    n = counts.sum()
    assert n == rows * calls
    stat = chisquare(counts[allowed], n * want[allowed] / want[allowed].sum())
    assert stat.pvalue > 1e-3 / 4, stat


def test_flashinfer_sampling_replays_in_a_cuda_graph_with_fresh_draws():
    _need("flashinfer")
    from layerzero_serve.kernels._flashinfer_backend import FlashInferSampling

    rows, vocab = 64, 32000
    s = FlashInferSampling(None)
    probs = torch.softmax(torch.randn(rows, vocab, device="cuda"), -1)
    top_k = torch.full((rows,), 50, dtype=torch.int32, device="cuda")
    tp = torch.full((rows,), 0.9, device="cuda")
    mp = torch.zeros(rows, device="cuda")
    seed = torch.full((rows,), 7, dtype=torch.int64, device="cuda")
    offset = torch.zeros(rows, dtype=torch.int64, device="cuda")
    s.sample(probs, top_k, tp, mp, seed, offset)  # warm-up: lazy buffers
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        out = s.sample(probs, top_k, tp, mp, seed, offset)
    draws = []
    for step in range(4):
        offset.fill_(step * 16)
        g.replay()
        draws.append(out.clone())
        eager = s.sample(probs, top_k, tp, mp, seed, offset)
        assert torch.equal(eager, draws[-1])  # replay == eager for the same random state
    assert not all(torch.equal(draws[0], d) for d in draws[1:])
