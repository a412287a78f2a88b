"""Kernel adapters: the catalog's declarations, backend probing, and each adapter's glue.

CPU part: every spec is well formed and says what its library documents; probing never raises
and explains unavailability; the torch adapter equals the reference kernels; the FlashAttention
(FA2/FA3/FA4) and xFormers adapters drive fake libraries that implement the documented
signatures (strict keywords, documented asserts) with the reference maths, so the glue (cache
views, page tables, length conventions, padding rows) is checked without the libraries.

GPU part (``@pytest.mark.gpu``, skipped without CUDA): every attention adapter whose backend is
available against the reference (decode, prefill/extend over a cached prefix, mixed, verify),
and every graph-safe decode adapter with ``write_kv`` + ``run`` captured in one CUDA graph and
replayed after re-planning with new lengths. Unavailable backends skip with the probe's reason.
"""

from __future__ import annotations

import subprocess
import sys
import types

import numpy as np
import pytest
import torch

from layerzero_serve.kernels import _backends as backends
from layerzero_serve.kernels import torch_ref
from layerzero_serve.kernels._backends import (
    BACKENDS,
    BackendStatus,
    clear_probe_cache,
    probe_all,
    probe_backend,
)
from layerzero_serve.kernels._catalog import all_specs
from layerzero_serve.kernels._torch_backend import TorchPagedAttention
from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.kernels.spec import KernelContext, Op, Reason

ATTN_OPS = (Op.ATTN_DECODE, Op.ATTN_PREFILL, Op.ATTN_VERIFY)
THIRD_PARTY = ("flashinfer", "flash_attn", "flash_attn_interface", "xformers", "liger_kernel")


def _spec(name):
    return next(s for s in all_specs() if s.name == name)


def _ctx(op, **kw):
    base = dict(device_type="cuda", sm=90, generation="hopper", dtype="bfloat16", head_dim=128)
    base.update(kw)
    return KernelContext(op, **base)


@pytest.fixture
def fresh_probes():
    clear_probe_cache()
    yield
    clear_probe_cache()


def _batch(q_lens, kv_lens, bs, hkv, d, dtype, device="cpu", seed=0, pad_tokens=0):
    """A scattered paged cache holding the first ``kv_len - q_len`` tokens of every sequence
    (the cached prefix) plus metadata for a step whose queries are the last ``q_lens`` positions.
    ``pad_tokens`` extra query rows (slot -1) follow the last sequence."""
    rng = np.random.default_rng(seed)
    need = sum(-(-int(n) // bs) for n in kv_lens)
    num_blocks = need + 4
    cache = torch.randn(num_blocks, 2, bs, hkv, d, generator=torch.Generator().manual_seed(seed))
    cache = cache.to(device=device, dtype=dtype)
    free = rng.permutation(np.arange(1, num_blocks))
    width = max(max(-(-int(n) // bs) for n in kv_lens), 1)
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
    slots.append(np.full(pad_tokens, -1))
    slot_mapping = np.concatenate(slots).astype(np.int32)
    meta = AttentionMetadata(
        num_seqs=len(kv_lens),
        num_tokens=int(qsl[-1]) + pad_tokens,
        block_size=bs,
        query_start_loc=torch.from_numpy(qsl).to(device),
        seq_lens=torch.tensor([int(n) for n in kv_lens], dtype=torch.int32, device=device),
        block_tables=torch.from_numpy(table).to(device),
        slot_mapping=torch.from_numpy(slot_mapping).to(device),
        max_query_len=int(max(q_lens)),
        max_seq_len=int(max(kv_lens)),
        query_start_loc_cpu=qsl.tolist(),
        seq_lens_cpu=[int(n) for n in kv_lens],
        block_tables_cpu=table,
    )
    return cache, meta


def _step(impl, cache, meta, hq, seed=1):
    """plan + write_kv + run on ``cache``; returns (out, reference out, reference cache)."""
    t, hkv, d = meta.num_tokens, cache.shape[3], cache.shape[4]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(t, h, d, generator=g) for h in (hq, hkv, hkv))
    q, k, v = (x.to(device=cache.device, dtype=cache.dtype) for x in (q, k, v))
    ref_cache = cache.clone()
    torch_ref.write_kv(k, v, ref_cache, meta.slot_mapping)
    ref = torch_ref.paged_attention(q, ref_cache, meta)
    impl.plan(meta)
    impl.write_kv(k, v, cache, meta)
    out = impl.run(q, cache, meta)
    return out, ref, ref_cache


# ---- the catalog --------------------------------------------------------------------------------


def test_every_spec_has_unique_name_known_backend_and_factory():
    specs = all_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names)), "duplicate kernel names"
    for s in specs:
        assert s.backend in BACKENDS, s.name
        assert callable(s.factory), s.name
        assert s.device_types and s.device_types <= {"cpu", "cuda"}, s.name
        if s.backend != "torch":
            assert s.doc, f"{s.name} must say where its constraints come from"
    for op in ATTN_OPS:  # the torch reference covers every attention op on every device
        torch_specs = [s for s in specs if s.op == op and s.backend == "torch"]
        assert torch_specs and torch_specs[0].device_types == {"cpu", "cuda"}


def test_importing_the_catalog_imports_no_kernel_library(tmp_path):
    code = (
        "import sys\n"
        "from layerzero_serve.kernels._catalog import all_specs\n"
        "all_specs()\n"
        f"print([m for m in {THIRD_PARTY!r} if m in sys.modules])\n"
    )
    out = subprocess.run(  # cwd: never the repository root (its kernels/ would shadow PyPI's)
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=tmp_path
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_torch_specs():
    graph_safe = {s.name: s.graph_safe for s in all_specs() if s.backend == "torch"}
    assert graph_safe["torch.paged_decode"] is True  # vectorised, no host sync
    assert graph_safe["torch.paged_prefill"] is False  # host loop over sequences
    assert graph_safe["torch.paged_verify"] is False
    assert graph_safe["torch.kv_write"] is True
    assert graph_safe["torch.sampler"] is True  # device RNG state, no host sync in sample()
    assert all(graph_safe[f"torch.{op}"] for op in ("rmsnorm", "rope", "swiglu"))
    for s in all_specs():
        if s.backend == "torch":
            cpu = KernelContext(s.op, "cpu", 0, "cpu", "float32", 80, 12, 4, 7, 3, 0)
            assert s.supports(cpu) is None, s.name  # any dtype, head dim, page size


def test_flashinfer_specs_follow_its_documentation():
    for name in ("flashinfer.decode", "flashinfer.prefill", "flashinfer.verify"):
        s = _spec(name)
        assert s.dtypes == {"float16", "bfloat16"}  # no float32
        assert s.head_dims == {64, 128, 256}
        assert s.block_sizes is None  # any page size (1, 16, ...)
        assert s.device_types == {"cuda"}
        assert s.supports(_ctx(s.op, dtype="float32")).code == Reason.DTYPE
        assert s.supports(_ctx(s.op, head_dim=96)).code == Reason.HEAD_DIM
        for bs in (1, 16, 64):
            assert s.supports(_ctx(s.op, block_size=bs)) is None
    decode, prefill = _spec("flashinfer.decode"), _spec("flashinfer.prefill")
    assert decode.graph_safe and decode.min_sm == 75  # CUDA-core decode: Turing+
    assert prefill.min_sm == 80 and not prefill.graph_safe
    t4 = dict(sm=75, generation="turing", dtype="float16")
    assert decode.supports(_ctx(Op.ATTN_DECODE, **t4)) is None
    assert prefill.supports(_ctx(Op.ATTN_PREFILL, q_len=0, **t4)).code == Reason.SM_TOO_OLD


def test_flash_attention_specs_follow_its_documentation():
    a100 = dict(sm=80, generation="ampere")
    b200 = dict(sm=100, generation="blackwell")
    fa2 = _spec("flash_attn.fa2_decode")
    assert fa2.supports(_ctx(Op.ATTN_DECODE, block_size=16, **a100)).code == Reason.BLOCK_SIZE
    for bs in (256, 512):  # "page_block_size must be a multiple of 256"
        assert fa2.supports(_ctx(Op.ATTN_DECODE, block_size=bs, **a100)) is None
    assert fa2.supports(_ctx(Op.ATTN_DECODE, block_size=256, sm=75)).code == Reason.SM_TOO_OLD
    fa3 = _spec("flash_attn.fa3_decode")
    assert fa3.supports(_ctx(Op.ATTN_DECODE, block_size=1)) is None  # any page size
    assert fa3.supports(_ctx(Op.ATTN_DECODE, **a100)).code == Reason.SM_TOO_OLD
    assert fa3.supports(_ctx(Op.ATTN_DECODE, **b200)).code == Reason.GENERATION
    fa4 = _spec("flash_attn.fa4_decode")
    assert fa4.supports(_ctx(Op.ATTN_DECODE, **b200)) is None
    assert fa4.supports(_ctx(Op.ATTN_DECODE)).code == Reason.SM_TOO_OLD  # no paged KV on sm90
    rtx5090 = dict(sm=120, generation="blackwell")
    assert fa4.supports(_ctx(Op.ATTN_DECODE, **rtx5090)).code == Reason.GENERATION
    assert fa4.supports(_ctx(Op.ATTN_DECODE, head_dim=256, **b200)).code == Reason.HEAD_DIM
    for s in all_specs():
        if s.backend == "flash_attn":
            assert s.dtypes == {"float16", "bfloat16"}
            assert s.graph_safe == (s.op != Op.ATTN_PREFILL), s.name  # ragged prefill: host ints


def test_xformers_and_liger_specs():
    for s in all_specs():
        if s.backend == "xformers":
            assert not s.graph_safe and s.dtypes == {"float16", "bfloat16"}
            assert s.supports(_ctx(s.op, head_dim=256)).code == Reason.HEAD_DIM
        if s.backend == "liger_kernel":
            assert s.device_types == {"cuda"} and s.graph_safe
            cpu = KernelContext(s.op, "cpu", 0, "cpu", "float32")
            assert s.supports(cpu).code == Reason.DEVICE_TYPE
    assert {s.op for s in all_specs() if s.backend == "liger_kernel"} == {
        Op.RMSNORM,
        Op.ROPE,
        Op.SWIGLU,
    }


def test_factories_fail_cleanly_when_the_library_is_missing():
    import importlib.util

    for s in all_specs():
        if s.backend in ("flashinfer", "flash_attn", "xformers", "liger_kernel"):
            if importlib.util.find_spec(s.backend) is not None:
                continue  # installed here: building it is the GPU tests' business
            with pytest.raises(ImportError):
                s.factory(_ctx(s.op))


# ---- probing ------------------------------------------------------------------------------------


def test_probe_on_this_machine(fresh_probes):
    st = probe_backend("torch")
    assert st == BackendStatus("torch", True, torch.__version__, "")
    statuses = probe_all()
    assert list(statuses) == list(BACKENDS)
    assert all(isinstance(s, BackendStatus) and s.name == b for b, s in statuses.items())
    for name in ("flashinfer", "flash_attn", "xformers", "liger_kernel"):
        st = statuses[name]
        if st.available:
            continue
        assert st.reason
        try:
            __import__(name)
        except Exception as e:
            assert st.reason.startswith(f"import failed: {type(e).__name__}"), st.reason
    triton = statuses["triton"]
    if not torch.cuda.is_available():
        assert not triton.available and "TRITON_INTERPRET" in triton.reason


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU machine expectations")
def test_probe_without_gpu_libraries(fresh_probes):
    for name in ("flashinfer", "xformers", "liger_kernel", "flash_attn"):
        st = probe_backend(name)
        assert not st.available
        assert st.reason.startswith("import failed: ModuleNotFoundError"), st.reason


def test_probe_is_cached_and_clearable(fresh_probes):
    assert probe_backend("flashinfer") is probe_backend("flashinfer")
    clear_probe_cache()
    assert probe_backend.cache_info().currsize == 0


def test_probe_reports_non_import_errors(fresh_probes, monkeypatch):
    import importlib

    real = importlib.import_module

    def fake_import(name, *a, **k):
        if name == "flashinfer":
            raise RuntimeError("CUDA driver initialization failed\nsecond line")
        if name == "liger_kernel":
            raise OSError("libcuda.so.1: cannot open shared object file")
        return real(name, *a, **k)

    monkeypatch.setattr(importlib, "import_module", fake_import)
    st = probe_backend("flashinfer")
    assert not st.available
    assert st.reason == "import failed: RuntimeError: CUDA driver initialization failed"
    st = probe_backend("liger_kernel")
    assert not st.available and st.reason.startswith("import failed: OSError: libcuda.so.1")


def test_probe_xformers_with_a_broken_extension(fresh_probes, monkeypatch):
    fake = types.ModuleType("xformers")
    fake.__version__ = "0.0.99"
    fake._has_cpp_library = False  # what xformers sets when its C++/CUDA extension fails
    monkeypatch.setitem(sys.modules, "xformers", fake)
    st = probe_backend("xformers")
    assert st == BackendStatus(
        "xformers",
        False,
        "0.0.99",
        "its C++/CUDA extension did not load (built for another torch)",
    )


def test_probe_never_raises(fresh_probes, monkeypatch):
    def boom():
        raise RuntimeError("driver exploded")

    monkeypatch.setitem(sys.modules, "liger_kernel", types.ModuleType("liger_kernel"))
    monkeypatch.setattr(backends.torch.cuda, "is_available", boom)
    st = probe_backend("liger_kernel")
    assert not st.available and "driver exploded" in st.reason
    assert probe_backend("torch").available
    unknown = probe_backend("no_such_backend")
    assert not unknown.available and unknown.reason == "unknown backend"


# ---- the torch adapter --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "q_lens,kv_lens,pad",
    [
        ([1, 1, 1, 1], [1, 17, 33, 5], 0),  # decode
        ([5, 1, 16, 3], [5, 40, 16, 19], 0),  # prefill, decode, extend over a cached prefix
        ([4, 4, 4], [4, 9, 30], 2),  # verify-shaped with padding rows
    ],
)
@pytest.mark.parametrize("bs", [1, 16])
def test_torch_adapter_matches_reference(q_lens, kv_lens, pad, bs):
    hq, hkv, d = 8, 2, 32
    cache, meta = _batch(q_lens, kv_lens, bs, hkv, d, torch.float32, pad_tokens=pad)
    op = Op.ATTN_DECODE if max(q_lens) == 1 else Op.ATTN_PREFILL
    ctx = KernelContext(op, "cpu", 0, "cpu", "float32", d, hq, hkv, bs, len(q_lens), 0)
    impl = _spec("torch.paged_decode" if op == Op.ATTN_DECODE else "torch.paged_prefill").factory(
        ctx
    )
    assert isinstance(impl, TorchPagedAttention)
    out, ref, ref_cache = _step(impl, cache, meta, hq)
    assert torch.equal(cache, ref_cache)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if pad:
        assert torch.all(out[meta.num_tokens - pad :] == 0)


# ---- FlashAttention and xFormers adapters over fake libraries -----------------------------------


def _gather(k_cache, v_cache, pages, kv_len):
    """K/V rows ``0 .. kv_len`` of one sequence from ``[N, bs, H, D]`` caches and its pages."""
    bs = k_cache.shape[1]
    nb = -(-kv_len // bs)
    k = k_cache[pages[:nb].long()].reshape(nb * bs, *k_cache.shape[2:])[:kv_len]
    v = v_cache[pages[:nb].long()].reshape(nb * bs, *v_cache.shape[2:])[:kv_len]
    return k, v


def _attend_rows(q_rows, k_cache, v_cache, pages, kv_len):
    """Bottom-right causal attention of ``q_rows`` [Lq, H, D] over one paged sequence."""
    if kv_len == 0:
        return torch.zeros_like(q_rows)
    k, v = _gather(k_cache, v_cache, pages, kv_len)
    return torch_ref.dense_causal_attention(q_rows, k, v)


def _check_cache_views(q, k_cache, v_cache, calls):
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1
    assert q.dtype == k_cache.dtype
    calls.append((k_cache.data_ptr(), v_cache.data_ptr()))


def _i32(*ts):
    for t in ts:
        assert t is None or (t.dtype == torch.int32 and t.dim() in (1, 2)), t


def _fake_fa2(calls):
    mod = types.ModuleType("flash_attn")

    def flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k=None,
        v=None,
        rotary_cos=None,
        rotary_sin=None,
        cache_seqlens=None,
        cache_batch_idx=None,
        cache_leftpad=None,
        block_table=None,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        rotary_interleaved=True,
        alibi_slopes=None,
        num_splits=0,
        return_softmax_lse=False,
    ):
        assert k is None and v is None and causal and block_table is not None
        assert k_cache.shape[1] % 256 == 0, "page_block_size must be a multiple of 256"
        _i32(cache_seqlens, block_table)
        _check_cache_views(q, k_cache, v_cache, calls)
        out = torch.stack(
            [
                _attend_rows(q[b], k_cache, v_cache, block_table[b], int(cache_seqlens[b]))
                for b in range(q.shape[0])
            ]
        )
        return out

    def flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q,
        cu_seqlens_k,
        max_seqlen_q,
        max_seqlen_k,
        dropout_p=0.0,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        softcap=0.0,
        alibi_slopes=None,
        deterministic=False,
        return_attn_probs=False,
        block_table=None,
    ):
        assert causal and block_table is not None and k.shape[1] % 256 == 0
        _i32(cu_seqlens_q, cu_seqlens_k, block_table)
        _check_cache_views(q, k, v, calls)
        assert q.shape[0] == int(cu_seqlens_q[-1])
        kv_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
        assert max(kv_lens) <= max_seqlen_k
        out = torch.empty_like(q)
        for b, n in enumerate(kv_lens):
            s, e = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
            assert e - s <= max_seqlen_q
            out[s:e] = _attend_rows(q[s:e], k, v, block_table[b], n)
        return out

    mod.flash_attn_with_kvcache = flash_attn_with_kvcache
    mod.flash_attn_varlen_func = flash_attn_varlen_func
    return {"flash_attn": mod}


def _fake_fa3(calls):
    mod = types.ModuleType("flash_attn_interface")

    def flash_attn_with_kvcache(
        q,
        k_cache,
        v_cache,
        k=None,
        v=None,
        qv=None,
        rotary_cos=None,
        rotary_sin=None,
        cache_seqlens=None,
        cache_batch_idx=None,
        cache_leftpad=None,
        page_table=None,
        cu_seqlens_q=None,
        cu_seqlens_k_new=None,
        max_seqlen_q=None,
        rotary_seqlens=None,
        q_descale=None,
        k_descale=None,
        v_descale=None,
        softmax_scale=None,
        causal=False,
        window_size=(-1, -1),
        attention_chunk=0,
        softcap=0.0,
        rotary_interleaved=True,
        scheduler_metadata=None,
        num_splits=0,
        pack_gqa=None,
        sm_margin=0,
        return_softmax_lse=False,
    ):
        assert k is None and v is None and causal and page_table is not None
        _i32(cache_seqlens, page_table, cu_seqlens_q)
        _check_cache_views(q, k_cache, v_cache, calls)
        if cu_seqlens_q is None:  # q: [B, L, H, D]
            return torch.stack(
                [
                    _attend_rows(q[b], k_cache, v_cache, page_table[b], int(cache_seqlens[b]))
                    for b in range(q.shape[0])
                ]
            )
        assert max_seqlen_q is not None and q.dim() == 3
        out = torch.empty_like(q)
        for b in range(cu_seqlens_q.shape[0] - 1):
            s, e = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
            out[s:e] = _attend_rows(q[s:e], k_cache, v_cache, page_table[b], int(cache_seqlens[b]))
        return out

    mod.flash_attn_with_kvcache = flash_attn_with_kvcache
    return {"flash_attn_interface": mod}


def _fake_fa4(calls):
    pkg = types.ModuleType("flash_attn")
    mod = types.ModuleType("flash_attn.cute")

    def flash_attn_varlen_func(
        q,
        k,
        v,
        cu_seqlens_q=None,
        cu_seqlens_k=None,
        max_seqlen_q=None,
        max_seqlen_k=None,
        seqused_q=None,
        seqused_k=None,
        page_table=None,
        softmax_scale=None,
        causal=False,
        window_size=(None, None),
        learnable_sink=None,
        softcap=0.0,
        num_splits=1,
        pack_gqa=None,
        deterministic=False,
        score_mod=None,
        mask_mod=None,
        block_sparse_tensors=None,
        cu_total_m_blocks=None,
        cu_total_n_blocks=None,
        aux_tensors=None,
        return_lse=False,
    ):
        assert causal and page_table is not None
        assert cu_seqlens_k is None, "page_table is not supported with cu_seqlens_k"
        _i32(cu_seqlens_q, seqused_k, page_table)
        _check_cache_views(q, k, v, calls)
        if cu_seqlens_q is None:
            out = torch.stack(
                [
                    _attend_rows(q[b], k, v, page_table[b], int(seqused_k[b]))
                    for b in range(q.shape[0])
                ]
            )
        else:
            out = torch.empty_like(q)
            for b in range(cu_seqlens_q.shape[0] - 1):
                s, e = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
                out[s:e] = _attend_rows(q[s:e], k, v, page_table[b], int(seqused_k[b]))
        return out, None

    mod.flash_attn_varlen_func = flash_attn_varlen_func
    pkg.cute = mod
    return {"flash_attn": pkg, "flash_attn.cute": mod}


def _fake_xformers(calls):
    root = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    fmha = types.ModuleType("xformers.ops.fmha")
    attn_bias = types.ModuleType("xformers.ops.fmha.attn_bias")

    class PagedBlockDiagonalCausalWithOffsetPaddedKeysMask:
        def __init__(self, q_seqlen, kv_seqlen, block_tables, page_size):
            self.q_seqlen, self.kv_seqlen = list(q_seqlen), list(kv_seqlen)
            self.block_tables, self.page_size = block_tables, page_size

        @classmethod
        def from_seqlens(cls, q_seqlen, kv_seqlen, block_tables, page_size, *, device=None):
            assert len(q_seqlen) == len(kv_seqlen)
            assert max(kv_seqlen) <= block_tables.shape[1] * page_size  # the keys' padding
            return cls(q_seqlen, kv_seqlen, block_tables, page_size)

    def memory_efficient_attention_forward(
        query, key, value, attn_bias=None, p=0.0, scale=None, *, op=None, output_dtype=None
    ):
        assert query.dim() == key.dim() == value.dim() == 5  # BMGHK
        assert key.shape == value.shape and key.shape[0] == 1 and query.shape[0] == 1
        assert key.stride(3) == 0  # the KV head dim is broadcast over the group, not copied
        ps, bt = attn_bias.page_size, attn_bias.block_tables
        assert int(bt.max()) * ps + ps <= key.shape[1]  # every addressed page lies in K/V
        calls.append((key.data_ptr(), value.data_ptr()))
        _, t, g, h, d = query.shape
        k_pages = key[0, :, :, 0].unflatten(0, (-1, ps))  # [pages, ps, G, D], a view
        v_pages = value[0, :, :, 0].unflatten(0, (-1, ps))
        q = query[0].reshape(t, g * h, d)
        out = torch.empty_like(q)
        start = 0
        for b, (ql, kl) in enumerate(zip(attn_bias.q_seqlen, attn_bias.kv_seqlen, strict=True)):
            out[start : start + ql] = _attend_rows(
                q[start : start + ql], k_pages, v_pages, bt[b], kl
            )
            start += ql
        assert start == t
        return out.reshape(1, t, g, h, d)

    attn_bias.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask = (
        PagedBlockDiagonalCausalWithOffsetPaddedKeysMask
    )
    ops.memory_efficient_attention_forward = memory_efficient_attention_forward
    fmha.attn_bias = attn_bias
    ops.fmha = fmha
    root.ops = ops
    return {
        "xformers": root,
        "xformers.ops": ops,
        "xformers.ops.fmha": fmha,
        "xformers.ops.fmha.attn_bias": attn_bias,
    }


FAKES = {
    "flash_attn.fa2": (_fake_fa2, 256),
    "flash_attn.fa3": (_fake_fa3, 16),
    "flash_attn.fa4": (_fake_fa4, 16),
    "xformers": (_fake_xformers, 16),
}
CASES = {  # op, q_lens, kv_lens, padding rows
    "decode": (Op.ATTN_DECODE, [1, 1, 1, 1], [1, 300, 17, 520], 0),
    "verify": (Op.ATTN_VERIFY, [3, 3, 3], [3, 40, 261], 0),
    "mixed": (Op.ATTN_PREFILL, [1, 37, 5, 16], [290, 37, 300, 16], 3),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("lib", list(FAKES))
def test_adapter_glue_over_fake_library(lib, case, monkeypatch):
    make, bs = FAKES[lib]
    calls: list = []
    for name, mod in make(calls).items():
        monkeypatch.setitem(sys.modules, name, mod)
    op, q_lens, kv_lens, pad = CASES[case]
    hq, hkv, d = 8, 2, 16
    cache, meta = _batch(q_lens, kv_lens, bs, hkv, d, torch.float32, pad_tokens=pad, seed=3)
    prefix = f"{lib}_" if lib.startswith("flash_attn") else f"{lib}."
    spec = _spec(prefix + op.value.removeprefix("attention_"))
    ctx = KernelContext(op, "cuda", 100, "blackwell", "float32", d, hq, hkv, bs, len(q_lens))
    impl = spec.factory(ctx)
    out, ref, ref_cache = _step(impl, cache, meta, hq)
    assert torch.equal(cache, ref_cache)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    if pad:
        assert torch.all(out[-pad:] == 0)
    # The library read our cache in place: K and V views of the very same storage.
    k_ptr, v_ptr = calls[-1]
    assert k_ptr == cache.data_ptr()
    assert v_ptr == cache[:, 1].data_ptr()


# ---- GPU: every available adapter against the reference -----------------------------------------

GPU_TOL = {torch.bfloat16: 2e-2, torch.float16: 2e-3}


def _need_cuda():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")


def _device_ctx(op, dtype, d, hq, hkv, bs, batch, q_len, graph=False):
    from layerzero_serve.selection._device import generation_of

    major, minor = torch.cuda.get_device_capability()
    sm = major * 10 + minor
    return KernelContext(
        op,
        "cuda",
        sm,
        generation_of(sm),
        str(dtype).removeprefix("torch."),
        d,
        hq,
        hkv,
        bs,
        batch,
        q_len,
        graph,
    )


def _usable(spec, ctx):
    st = probe_backend(spec.backend)
    if not st.available:
        pytest.skip(f"{spec.backend} unavailable: {st.reason}")
    why = spec.supports(ctx)
    if why is not None:
        pytest.skip(f"{spec.name} cannot run this plan here: {why}")


ATTN_SPECS = [s.name for s in all_specs() if s.op in ATTN_OPS]
GPU_CASES = {  # q_lens, kv_lens (batch 1..64, kv lengths 1..4096)
    "decode_b1": ([1], [4096]),
    "decode_b64": ([1] * 64, [1, *range(65, 4096, 64)][:64]),
    "extend": ([5, 64, 100, 16], [37, 300, 1025, 16]),
    "mixed": ([1, 64, 1, 16], [4000, 64, 1, 33]),
    "verify": ([4] * 8, [4, 9, 100, 257, 1000, 2048, 3000, 4096]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("case", list(GPU_CASES))
@pytest.mark.parametrize("gqa", [1, 4, 8])
@pytest.mark.parametrize("name", ATTN_SPECS)
def test_gpu_adapter_matches_reference(name, gqa, case):
    _need_cuda()
    spec = _spec(name)
    q_lens, kv_lens = GPU_CASES[case]
    op = (
        Op.ATTN_DECODE
        if case.startswith("decode")
        else (Op.ATTN_VERIFY if case == "verify" else Op.ATTN_PREFILL)
    )
    if spec.op != op:
        pytest.skip("case is for another op")
    hkv, d, dtype = 2, 128, torch.bfloat16
    bs = 256 if spec.check is not None and "fa2" in name else 16
    q_len = {Op.ATTN_DECODE: 1, Op.ATTN_VERIFY: 4, Op.ATTN_PREFILL: 0}[op]
    ctx = _device_ctx(op, dtype, d, hkv * gqa, hkv, bs, len(q_lens), q_len)
    _usable(spec, ctx)
    cache, meta = _batch(q_lens, kv_lens, bs, hkv, d, dtype, device="cuda", seed=gqa)
    out, ref, ref_cache = _step(spec.factory(ctx), cache, meta, hkv * gqa)
    assert torch.equal(cache, ref_cache)
    torch.testing.assert_close(out.float(), ref.float(), atol=GPU_TOL[dtype], rtol=GPU_TOL[dtype])


GRAPH_DECODE = [s.name for s in all_specs() if s.op == Op.ATTN_DECODE and s.graph_safe]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bs", [1, 16])
@pytest.mark.parametrize("name", GRAPH_DECODE)
def test_gpu_decode_graph_captures_write_and_run(name, bs, dtype):
    """write_kv + run captured in one CUDA graph; each replay follows a re-plan with new lengths
    (new slots), and must match the same step run eagerly and the reference."""
    _need_cuda()
    spec = _spec(name)
    b, hkv, hq, d, max_len = 8, 2, 8, 128, 1024
    bs = 256 if "fa2" in name else bs
    ctx = _device_ctx(Op.ATTN_DECODE, dtype, d, hq, hkv, bs, b, 1, graph=True)
    _usable(spec, ctx)
    rng = np.random.default_rng(bs)
    cache, meta = _batch([1] * b, [max_len] * b, bs, hkv, d, dtype, device="cuda", seed=bs)
    table = meta.block_tables_cpu
    impl = spec.factory(ctx)
    q = torch.zeros(b, hq, d, dtype=dtype, device="cuda")
    k = torch.zeros(b, hkv, d, dtype=dtype, device="cuda")
    v = torch.zeros_like(k)

    def set_lengths(lens):
        pos = lens - 1
        slots = table[np.arange(b), pos // bs].astype(np.int64) * bs + pos % bs
        meta.seq_lens.copy_(torch.from_numpy(lens.astype(np.int32)))
        meta.slot_mapping.copy_(torch.from_numpy(slots.astype(np.int32)))
        meta.seq_lens_cpu = lens.tolist()
        meta.max_seq_len = int(lens.max())
        impl.plan(meta)

    set_lengths(np.full(b, max_len))
    impl.write_kv(k, v, cache, meta)  # warm-up (JIT, autotune, workspace) outside the capture
    impl.run(q, cache, meta)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        impl.write_kv(k, v, cache, meta)
        out = impl.run(q, cache, meta)
    for trial in range(4):
        set_lengths(rng.integers(1, max_len + 1, size=b))
        for t in (q, k, v):
            t.copy_(torch.randn_like(t))
        before = cache.clone()
        graph.replay()
        ref_cache = before.clone()
        torch_ref.write_kv(k, v, ref_cache, meta.slot_mapping)
        assert torch.equal(cache, ref_cache), f"trial {trial}: KV write"
        eager_cache = before.clone()
        impl.write_kv(k, v, eager_cache, meta)
        eager = impl.run(q, eager_cache, meta)
        assert torch.equal(out, eager), f"trial {trial}: replay != eager"
        ref = torch_ref.paged_decode(q, ref_cache, meta.block_tables, meta.seq_lens)
        torch.testing.assert_close(out.float(), ref.float(), atol=GPU_TOL[dtype], rtol=2e-2)
