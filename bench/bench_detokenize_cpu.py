"""Host cost per engine step of incremental detokenization and stop-string checks at batch 256
(``OutputProcessor.apply``, what ``Engine.step`` runs after the scheduler's update), on real
text through the embedded default model's byte-level BPE tokenizer: one new token per request
and step (decode), steady state after 64 tokens. Cases: no text (``detokenize=False``),
stop token ids only, text, text + 4 stop strings (none matches, so every request keeps going),
text with 1 to 4 tokens per step (speculative decoding); and, for scale, re-decoding each
request's whole output every step (what the window avoids) at 256 output tokens.

    python bench/bench_detokenize_cpu.py [--out bench/results] [--batch 256] [--steps 64]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from common import write_result  # noqa: E402

from layerzero_serve._default_model import _CORPUS, ensure_default_model  # noqa: E402
from layerzero_serve._output_processor import OutputProcessor  # noqa: E402
from layerzero_serve.sampling import SamplingParams  # noqa: E402
from layerzero_serve.tokenizer import Tokenizer  # noqa: E402
from layerzero_serve.types import RequestOutput  # noqa: E402

STOPS = ["<END>", "###", "\n\nUser:", "</answer>"]


class _NoScheduler:
    def abort(self, name: str) -> bool:  # no stop string matches in this text
        raise AssertionError(name)


def _streams(tok: Tokenizer, batch: int, length: int) -> list[list[int]]:
    ids = tok.encode(" ".join([_CORPUS] * 8), add_special_tokens=False)
    rng = random.Random(0)
    starts = [rng.randrange(len(ids) - length) for _ in range(batch)]
    return [ids[s : s + length] for s in starts]


def run_case(tok, params: SamplingParams, streams, steps: int, per_step: int = 1) -> dict:
    """Median / p90 microseconds of ``apply`` per step, after 64 warm-up tokens."""
    proc = OutputProcessor(_NoScheduler())
    names = [f"r{i}" for i in range(len(streams))]
    if OutputProcessor.needs_entry(params, tok):
        for n in names:
            proc.add(n, params, tok)
    times, rng = [], random.Random(1)
    pos = [0] * len(streams)
    for step in range(64 + steps):
        outs = []
        for i, n in enumerate(names):
            k = rng.randint(1, per_step)
            new = streams[i][pos[i] : pos[i] + k]
            pos[i] += k
            outs.append(RequestOutput(n, new, False, None, pos[i]))
        t0 = time.perf_counter()
        if proc:
            proc.apply(outs)
        if step >= 64:
            times.append(time.perf_counter() - t0)
    us = sorted(t * 1e6 for t in times)
    return {
        "median_us_per_step": round(statistics.median(us), 1),
        "p90_us_per_step": round(us[int(0.9 * len(us))], 1),
        "median_us_per_request": round(statistics.median(us) / len(streams), 3),
    }


def full_redecode(tok, streams, length: int, steps: int) -> dict:
    """Decoding each request's whole output (``length`` tokens) once per step."""
    dec = tok.backend_tokenizer.decode
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        for s in streams:
            dec(s[:length], skip_special_tokens=True)
        times.append(time.perf_counter() - t0)
    return {"median_us_per_step": round(statistics.median(times) * 1e6, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="results folder")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=64)
    args = ap.parse_args()
    tok = Tokenizer.from_pretrained(ensure_default_model())
    streams = _streams(tok, args.batch, 64 + 4 * args.steps + 8)
    base = {"temperature": 0.0, "max_tokens": 4096}
    cases = {
        "no_text": SamplingParams(detokenize=False, **base),
        "stop_token_ids_only": SamplingParams(detokenize=False, stop_token_ids=[2], **base),
        "text": SamplingParams(**base),
        "text_4_stop_strings": SamplingParams(stop=STOPS, **base),
    }
    res: dict[str, object] = {
        "batch": args.batch,
        "steps": args.steps,
        "tokenizer": "default model (byte-level BPE, 1024 ids)",
    }
    for name, params in cases.items():
        res[name] = run_case(tok, params, streams, args.steps)
    res["text_4_stop_strings_1to4_tokens_per_step"] = run_case(
        tok, SamplingParams(stop=STOPS, **base), streams, args.steps, per_step=4
    )
    res["full_redecode_256_tokens"] = full_redecode(tok, streams, 256, 10)
    for name, v in res.items():
        print(f"{name:42s} {v}")
    print("wrote", write_result("detokenize_cpu", res, args.out))


if __name__ == "__main__":
    main()
