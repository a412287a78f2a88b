"""Your own PyTorch decoder on the runtime's paged attention, KV cache and scheduler; with CUDA,
decode replays through ``DecodeGraphRunner`` per bucket, checked bitwise against eager. CPU too."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import layerzero_serve.kv_cache as kvc
from layerzero_serve.kernels.metadata import AttentionMetadata
from layerzero_serve.runner.attention import build_attention
from layerzero_serve.runner.cuda_graph import DecodeGraphRunner
from layerzero_serve.scheduler import Scheduler, SchedulerConfig
from layerzero_serve.types import Request

VOCAB, HIDDEN, LAYERS, HQ, HKV, D = 256, 64, 2, 4, 2, 32  # D=32: GPU Triton kernels' smallest
BLOCK, MAX_LEN, NUM_BLOCKS, BUCKETS = 4, 64, 64, [1, 2, 4]  # BLOCK divides no prompt length
WIDTH = MAX_LEN // BLOCK  # block-table width the graphs bake in
PROMPT_LENS, MAX_NEW = (5, 11, 19, 26), (12, 7, 4, 8)  # decode batches 4, 3, 2, 1
PROMPTS = [np.random.default_rng(n).integers(0, VOCAB, n).tolist() for n in PROMPT_LENS]
as_int32 = lambda a, device: torch.as_tensor(np.asarray(a, np.int32), device=device)
from_host = AttentionMetadata.from_host  # host arrays -> one step's attention metadata


class TinyDecoder(nn.Module):
    """Sequences meet only in ``attn(layer, q [T, HQ, D], k/v [T, HKV, D], meta)``."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.config = SimpleNamespace(vocab_size=VOCAB)  # what DecodeGraphRunner reads
        h, q, kv = HIDDEN, HQ * D, HKV * D
        shapes = dict(q=(h, q), k=(h, kv), v=(h, kv), o=(q, h), up=(h, 4 * h), down=(4 * h, h))
        self.embed, self.pos = nn.Embedding(VOCAB, h), nn.Embedding(MAX_LEN, h)
        self.lm_head = nn.Linear(h, VOCAB, bias=False)
        layer = lambda: nn.ModuleDict({n: nn.Linear(*s, bias=False) for n, s in shapes.items()})
        self.layers = nn.ModuleList(layer() for _ in range(LAYERS))
        gen = torch.Generator().manual_seed(seed)  # its own generator: same weights every time
        for p in self.parameters():
            p.data = torch.randn(p.shape, generator=gen) * 0.15

    def forward(self, input_ids, positions, attn, meta) -> torch.Tensor:
        x, t = self.embed(input_ids) + self.pos(positions), input_ids.shape[0]
        for i, ly in enumerate(self.layers):
            q, k, v = (ly[n](F.rms_norm(x, (HIDDEN,))).view(t, -1, D) for n in "qkv")
            x = x + ly["o"](attn(i, q, k, v, meta).reshape(t, -1))
            x = x + ly["down"](F.silu(ly["up"](F.rms_norm(x, (HIDDEN,)))))
        return F.rms_norm(x, (HIDDEN,))

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:  # [N, VOCAB] float32
        return self.lm_head(hidden).float()  # (the graph runner's contract)


class PagedRunner:
    """The scheduler's runner: ``SchedulerOutput -> new token ids per row`` (greedy)."""

    def __init__(self, model: TinyDecoder, device: torch.device, graphs: bool = False) -> None:
        self.model, self.device = model.to(device), device
        spec = kvc.KVCacheSpec(LAYERS, HKV, D, BLOCK, torch.float32)
        self.kv = kvc.KVCache(spec, NUM_BLOCKS, device=device)
        self.attn = build_attention(self.kv, HQ, device, max_num_seqs=len(PROMPTS))
        self.graphs, self.bucket_attn, self.replays, self.decode_batches = None, {}, [], []
        plan = lambda b: self.bucket_attn.setdefault(
            b, build_attention(self.kv, HQ, device, graph_batch=b)
        )
        if graphs:  # captured per bucket, each with the graph-mode kernels plan(bucket) picks
            self.graphs = DecodeGraphRunner(model, self.kv, plan, BUCKETS, WIDTH, device)
            self.graphs.capture(progress=False)

    def eager(self, attn, ids, pos, meta, rows) -> torch.Tensor:
        """Logits ``[len(rows), VOCAB]`` of the packed tokens ``rows``."""
        attn.begin_step(meta)  # picks the phase's kernel and runs its host-side plan
        hidden = self.model(as_int32(ids, self.device), as_int32(pos, self.device), attn, meta)
        return self.model.compute_logits(hidden[as_int32(rows, self.device).long()])

    @torch.inference_mode()
    def __call__(self, out) -> list[list[int]]:
        starts, lens = np.asarray(out.starts), np.asarray(out.num_scheduled)
        table = kvc.build_block_table(out.block_ids)
        slots = kvc.build_slot_mapping(table, starts, lens, BLOCK)
        pos = kvc.build_positions(starts, lens)[1]
        reqs = zip(out.requests, starts, lens, strict=True)
        ids = np.concatenate([r.all_token_ids[s : s + n] for r, s, n in reqs])
        sampling = [out.samples(i) for i in range(len(lens))]
        if decode := lens.max() == 1 and all(sampling):
            self.decode_batches.append(len(lens))
        if decode and self.graphs:
            logits = self.replay(ids, pos, slots, table)
        else:
            meta = from_host(lens, starts + lens, table, BLOCK, self.device, slots)
            logits = self.eager(self.attn, ids, pos, meta, np.cumsum(lens) - 1)
        toks = logits.argmax(-1).tolist()
        return [[toks[i]] if sampling[i] else [] for i in range(len(lens))]

    def replay(self, ids, pos, slots, table) -> torch.Tensor:
        """The bucket's graph, checked against its kernels run eagerly on the padded batch."""
        g, n = self.graphs, len(ids)
        b = g.bucket_for(n)  # padding rows: one key of the null block, slot -1
        pad = lambda a, fill: np.concatenate([a, np.full(b - n, fill)])
        wide = np.pad(table, ((0, b - n), (0, g.width - table.shape[1])))
        meta = from_host(np.ones(b), pad(pos + 1, 1), wide, BLOCK, self.device, pad(slots, -1))
        eager = self.eager(self.bucket_attn[b], pad(ids, 0), pad(pos, 0), meta, np.arange(b))[:n]
        logits = g.run(ids, pos, slots, pos + 1, table)  # a view: consumed before the next replay
        self.replays.append((b, n, torch.equal(logits, eager)))
        return logits


def generate(device: torch.device, graphs: bool = False) -> tuple[list[list[int]], PagedRunner]:
    runner = PagedRunner(TinyDecoder(), device, graphs)
    kv = kvc.KVCacheManager(NUM_BLOCKS, BLOCK)  # block ids for the runner's KVCache (same count)
    sched = Scheduler(SchedulerConfig(4, 24, MAX_LEN), kv)  # 24 tokens/step: prefill in chunks
    tokens = {f"p{i}": [] for i in range(len(PROMPTS))}
    for rid, prompt, n in zip(tokens, PROMPTS, MAX_NEW, strict=True):
        sched.add_request(Request(rid, prompt, max_tokens=n))
    while sched.has_unfinished():
        for o in sched.step(runner):
            tokens[o.request_id].extend(o.new_token_ids)
    kv.check_integrity()
    return list(tokens.values()), runner


def main() -> dict:
    tokens, runner = generate(torch.device("cpu"))
    res = {"tokens": tokens, "decode_batches": runner.decode_batches, "kernels": runner.attn.name}
    print(res)
    if torch.cuda.is_available():  # CUDA: decode replays the captured graphs
        res["gpu_tokens"], gpu = generate(torch.device("cuda"), graphs=True)
        ok = res["replays_bitwise_equal"] = all(equal for *_, equal in gpu.replays)
        res["replays"] = gpu.replays
        print(f"CUDA graphs: {len(gpu.replays)} replays, all bitwise equal to eager: {ok}")
    return res


if __name__ == "__main__":
    main()
