"""Logit parity with Hugging Face transformers (the oracle) for every supported architecture.

Tiny random checkpoints are written with ``save_pretrained`` (fp32), loaded with
``layerzero_serve._models.load_model`` and run through a small paged reference attention defined
here (it honours ``slot_mapping`` / ``block_tables`` like the runtime's kernels do). Checked:
prefill of single prompts, several prompts packed in one forward, and chunked prefill followed
by token-by-token decode through the paged cache, all against ``hf(input_ids).logits``.
"""

from __future__ import annotations

import math

import pytest
import torch

from layerzero_serve._models import LlamaForCausalLM, load_model
from layerzero_serve.kernels.metadata import AttentionMetadata

transformers = pytest.importorskip("transformers")

from hf_checkpoints import CASES, make_checkpoint  # noqa: E402

BLOCK_SIZE = 4
PROMPT_LENS = (1, 5, 11, 17, 40)


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """Tiny matmuls: intra-op threads only add overhead (and thrash on a loaded CI box)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module", params=list(CASES))
def checkpoint(request, tmp_path_factory):
    name = request.param
    path, hf, cfg = make_checkpoint(name, tmp_path_factory.mktemp(name))
    ours = load_model(path, dtype=torch.float32)
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in PROMPT_LENS]
    with torch.no_grad():
        ref = [hf(torch.tensor([p])).logits[0].float() for p in prompts]
    return name, ours, prompts, ref, path


class PagedRefAttention:
    """Reference paged attention: writes K/V at ``slot_mapping`` and, for each sequence, attends
    causally over the ``seq_lens[i]`` cached tokens found through ``block_tables[i]``."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int):
        c = model.config
        shape = (c.num_layers, num_blocks * BLOCK_SIZE, c.num_kv_heads, c.head_dim)
        self.k = torch.zeros(shape, dtype=model.dtype)
        self.v = torch.zeros(shape, dtype=model.dtype)
        self.scale = c.head_dim**-0.5

    def __call__(self, layer, q, k, v, meta: AttentionMetadata):
        slots = meta.slot_mapping.long()
        valid = slots >= 0
        self.k[layer, slots[valid]] = k[valid]
        self.v[layer, slots[valid]] = v[valid]
        out = torch.zeros_like(q)
        qsl = meta.query_start_loc_cpu
        for i in range(meta.num_seqs):
            s, e, kv_len = qsl[i], qsl[i + 1], meta.seq_lens_cpu[i]
            blocks = meta.block_tables[i, : math.ceil(kv_len / meta.block_size)].long()
            kv_slots = (blocks[:, None] * meta.block_size + torch.arange(meta.block_size)).flatten()
            keys, vals = self.k[layer, kv_slots[:kv_len]], self.v[layer, kv_slots[:kv_len]]
            group = q.shape[1] // keys.shape[1]
            keys = keys.repeat_interleave(group, dim=1)
            vals = vals.repeat_interleave(group, dim=1)
            scores = torch.einsum("qhd,khd->hqk", q[s:e], keys) * self.scale
            q_pos = torch.arange(kv_len - (e - s), kv_len)[:, None]
            scores = scores.masked_fill(torch.arange(kv_len)[None, :] > q_pos, float("-inf"))
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
            out[s:e] = torch.einsum("hqk,khd->qhd", probs, vals)
        return out


class Seq:
    def __init__(self, first_block: int, max_len: int):
        self.blocks = list(range(first_block, first_block + math.ceil(max_len / BLOCK_SIZE)))
        self.cached = 0


def _step(model, attn, seqs: list[Seq], chunks: list[list[int]]) -> torch.Tensor:
    """One packed forward of ``chunks[i]`` appended to ``seqs[i]``; logits of every token."""
    ids, pos, slots, qsl, seq_lens = [], [], [], [0], []
    for seq, chunk in zip(seqs, chunks, strict=True):
        for j, tok in enumerate(chunk):
            p = seq.cached + j
            ids.append(tok)
            pos.append(p)
            slots.append(seq.blocks[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE)
        seq.cached += len(chunk)
        qsl.append(qsl[-1] + len(chunk))
        seq_lens.append(seq.cached)
    width = max(len(s.blocks) for s in seqs)
    tables = torch.zeros(len(seqs), width, dtype=torch.int32)
    for i, s in enumerate(seqs):
        tables[i, : len(s.blocks)] = torch.tensor(s.blocks, dtype=torch.int32)
    meta = AttentionMetadata(
        num_seqs=len(seqs),
        num_tokens=len(ids),
        block_size=BLOCK_SIZE,
        query_start_loc=torch.tensor(qsl, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=tables,
        slot_mapping=torch.tensor(slots, dtype=torch.int32),
        max_query_len=max(map(len, chunks)),
        max_seq_len=max(seq_lens),
        query_start_loc_cpu=qsl,
        seq_lens_cpu=seq_lens,
    )
    with torch.inference_mode():
        hidden = model(torch.tensor(ids), torch.tensor(pos), attn, meta)
        assert hidden.shape == (len(ids), model.config.hidden_size)
        logits = model.compute_logits(hidden)
    assert logits.dtype == torch.float32
    return logits


def _check(name: str, ours: torch.Tensor, ref: torch.Tensor) -> float:
    scale = ref.abs().max().item()
    torch.testing.assert_close(
        ours, ref, rtol=1e-4, atol=1e-4 * scale, msg=lambda m: f"{name}: {m}"
    )
    return (ours - ref).abs().max().item() / scale


def _alloc(prompts) -> list[Seq]:
    seqs, nxt = [], 1  # block 0 is the null block
    for p in prompts:
        seqs.append(Seq(nxt, len(p)))
        nxt += len(seqs[-1].blocks)
    return seqs


def test_prefill_single_prompts(checkpoint):
    name, model, prompts, ref, _ = checkpoint
    for p, r in zip(prompts, ref, strict=True):
        attn = PagedRefAttention(model, num_blocks=64)
        (seq,) = _alloc([p])
        _check(name, _step(model, attn, [seq], [p]), r)


def test_prefill_packed_batch(checkpoint):
    """All prompts packed back to back in one forward, blocks interleaved across sequences."""
    name, model, prompts, ref, _ = checkpoint
    attn = PagedRefAttention(model, num_blocks=64)
    seqs = _alloc(prompts)
    perm = torch.randperm(63, generator=torch.Generator().manual_seed(0)) + 1
    for s in seqs:  # scatter blocks: the model must not assume contiguity
        s.blocks = [int(perm[b - 1]) for b in s.blocks]
    logits = _step(model, attn, seqs, prompts)
    for i, r in enumerate(ref):
        s, e = sum(PROMPT_LENS[:i]), sum(PROMPT_LENS[: i + 1])
        _check(name, logits[s:e], r)


def _chunked_prefill_then_decode(name, model, prompts, ref, attn) -> None:
    long = [p for p in prompts if len(p) >= 8]
    refs = [r for p, r in zip(prompts, ref, strict=True) if len(p) >= 8]
    seqs = _alloc(long)
    split = [len(p) - 4 for p in long]
    first = _step(model, attn, seqs, [p[: n // 2] for p, n in zip(long, split, strict=True)])
    second = _step(model, attn, seqs, [p[n // 2 : n] for p, n in zip(long, split, strict=True)])
    off1 = off2 = 0
    for i, n in enumerate(split):
        _check(name, first[off1 : off1 + n // 2], refs[i][: n // 2])
        _check(name, second[off2 : off2 + n - n // 2], refs[i][n // 2 : n])
        off1, off2 = off1 + n // 2, off2 + n - n // 2
    for t in range(4):
        logits = _step(model, attn, seqs, [[p[n + t]] for p, n in zip(long, split, strict=True)])
        for i, n in enumerate(split):
            _check(name, logits[i : i + 1], refs[i][n + t : n + t + 1])


def test_chunked_prefill_then_decode(checkpoint):
    """Prefill in two chunks, then decode one token per step for every sequence at once."""
    name, model, prompts, ref, _ = checkpoint
    _chunked_prefill_then_decode(name, model, prompts, ref, PagedRefAttention(model, 64))


class TorchRefKernelAttention:
    """The runtime's reference kernels (``kernels/torch_ref.py``), when present."""

    def __init__(self, model: LlamaForCausalLM, num_blocks: int):
        try:
            from layerzero_serve.kernels import torch_ref
        except ImportError:
            pytest.skip("layerzero_serve.kernels.torch_ref not available")
        if not all(hasattr(torch_ref, f) for f in ("write_kv", "paged_attention")):
            pytest.skip("torch_ref lacks write_kv/paged_attention")
        self.ref = torch_ref
        c = model.config
        shape = (num_blocks, 2, BLOCK_SIZE, c.num_kv_heads, c.head_dim)
        self.cache = [torch.zeros(shape, dtype=model.dtype) for _ in range(c.num_layers)]

    def __call__(self, layer, q, k, v, meta: AttentionMetadata):
        self.ref.write_kv(k, v, self.cache[layer], meta.slot_mapping)
        return self.ref.paged_attention(q, self.cache[layer], meta)


def test_with_runtime_reference_kernels(checkpoint):
    name, model, prompts, ref, _ = checkpoint
    _chunked_prefill_then_decode(name, model, prompts, ref, TorchRefKernelAttention(model, 64))


def test_max_logit_difference_report(checkpoint, record_property):
    name, model, prompts, ref, _ = checkpoint
    worst = 0.0
    for p, r in zip(prompts, ref, strict=True):
        attn = PagedRefAttention(model, num_blocks=64)
        (seq,) = _alloc([p])
        ours = _step(model, attn, [seq], [p])
        worst = max(worst, (ours - r).abs().max().item())
    record_property(f"max_abs_logit_diff[{name}]", worst)
    print(f"{name}: max |logit diff| = {worst:.3e}, logit scale = {ref[-1].abs().max():.3f}")
    assert worst < 1e-4 * max(r.abs().max().item() for r in ref) + 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_matches_transformers(checkpoint, dtype):
    """Same checkpoint loaded in bf16/fp16 by both (HF keeps its RoPE inv_freq in float32 when
    loading with ``dtype=``). Same op order, so on CPU this is bit-exact; the tolerance only
    allows for kernel differences (one or two ulps at the logits' scale)."""
    name, _, prompts, _, path = checkpoint
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, attn_implementation="eager"
    ).eval()
    ours = load_model(path, dtype=dtype)
    assert ours.dtype == dtype and ours.lm_head.weight.dtype == dtype
    for p in prompts:
        with torch.no_grad():
            ref = hf(torch.tensor([p])).logits[0].float()
        (seq,) = _alloc([p])
        logits = _step(ours, PagedRefAttention(ours, num_blocks=64), [seq], [p])
        scale = ref.abs().max().item()
        torch.testing.assert_close(logits, ref, rtol=0, atol=2e-2 * scale, msg=name)
