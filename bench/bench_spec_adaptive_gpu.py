"""Adaptive speculation measured where drafts exist: plain decoding vs fixed k vs adaptive k in
one engine (dummy:llama3-8b, bf16, CUDA graphs and async scheduling: the GPU defaults).

Workloads (each at batch 1 and 8):

* ``oracle``: drafts = the target's own greedy continuation, each draft replaced by another id
  with probability r (r = 0.0, 0.5, 0.8, 0.95: from clearly worth it to clearly not);
* ``ngram_rewrite``: n-gram lookup on a prompt that holds text P, the model's own greedy
  continuation C of P, then P again, so regenerating C is copying from the prompt;
* ``ngram_loop``: n-gram lookup on random prompts (greedy decoding on random weights tends to
  fall into loops, which n-gram lookup catches; the drafted counts say whether it did).

Modes, in one engine built with ``speculative_method="ngram"`` (the proposer is replaced per
workload): ``plain`` (the engine's speculation hooks swapped for ``NoSpeculation``, as in an
engine built without speculation), ``fixed`` (k = k_max every step) and ``adaptive`` (a fresh
``AdaptiveK`` from ``SpecCoordinator.new_adaptive()`` per run, as ``adaptive_speculation=True``
builds). Note: setting ``Engine.spec = None`` does not turn speculation off (the step loop uses
its ``SpeculationHooks``); plain runs here are checked to record no drafts and no probes.

Per point: one plain reference run, ``--warmup`` discarded rounds, then ``--repeats`` paired
rounds in ABC / CBA order (plain, fixed, adaptive; reversed on odd rounds) so a drift over time
favours no mode. Reported per mode: median ms per output token (decode phase, per sequence),
per speculative run the drafted and accepted tokens, acceptance rate, shadow probes; per pair
the ratios adaptive/plain, adaptive/fixed and adaptive/best (best = the faster of plain and
fixed by median) with a 95% t interval on log ratios; greedy outputs compared with the plain
reference (lossless). Verdict per point: adaptive is at least as fast as the better of plain
and fixed k when the interval's upper end of adaptive/best is <= 1 + noise or the median paired
ratio is <= 1.

    python bench/bench_spec_adaptive_gpu.py [--quick] [--out DIR]          # GPU, ~3-4 min
    python bench/bench_spec_adaptive_gpu.py --device cpu --tiny --quick     # CPU smoke, seconds

Exit status 3 (after writing the JSON) when a greedy output differed between modes, unless
``--allow-mismatch``.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import write_result  # noqa: E402

from layerzero_serve.engine import Engine  # noqa: E402
from layerzero_serve.sampling import SamplingParams  # noqa: E402
from layerzero_serve.spec_decode import NgramProposer, Proposer  # noqa: E402
from layerzero_serve.spec_decode._metrics import SpecDecodeMetrics  # noqa: E402
from layerzero_serve.spec_decode.step_hooks import NoSpeculation  # noqa: E402

MODEL = "dummy:llama3-8b"
TINY = "dummy:tiny"
MODES = ("plain", "fixed", "adaptive")
NAME = "spec_adaptive_gpu"

# two-sided 95% quantiles of Student's t by degrees of freedom
_T975 = {1: 12.71, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class OracleProposer(Proposer):
    """Drafts = the reference greedy continuation of the request's prompt, each id replaced by a
    different random id with probability ``r``."""

    name = "oracle"

    def __init__(self, reference: dict, prompt_len: int, r: float, vocab: int, seed: int):
        self.reference, self.prompt_len, self.r, self.vocab = reference, prompt_len, r, vocab
        self.rng = np.random.default_rng(seed)
        self.proposed = self.corrupted = 0

    def propose(self, requests_tokens, k):
        out = []
        for toks in requests_tokens:
            ref = self.reference.get(tuple(int(t) for t in toks[: self.prompt_len]), ())
            n = len(toks)
            d = [int(t) for t in ref[n : n + k]]
            for j in range(len(d)):
                if self.rng.random() < self.r:
                    d[j] = int((d[j] + 1 + self.rng.integers(0, self.vocab - 1)) % self.vocab)
                    self.corrupted += 1
            self.proposed += len(d)
            out.append(d)
        return out


class ModeSwitch:
    """Puts one engine in plain / fixed-k / adaptive-k mode between runs (no request running)."""

    def __init__(self, eng: Engine) -> None:
        if eng.spec is None:
            raise SystemExit("the engine must be built with speculation")
        self.eng, self.spec = eng, eng.spec
        self.hooks = eng._speculation  # the engine's SpeculationHooks
        self.off = NoSpeculation()

    def set(self, mode: str, proposer: Proposer | None, pass_ids: bool) -> None:
        eng, spec = self.eng, self.spec
        assert not eng.has_unfinished()
        spec.metrics = SpecDecodeMetrics(spec.k_max)
        if mode == "plain":
            eng._speculation = self.off
            spec.adaptive = None
            return
        eng._speculation = self.hooks
        spec.proposer, spec._pass_ids = proposer, pass_ids
        spec.adaptive = spec.new_adaptive() if mode == "adaptive" else None
        # per-run state of the coordinator, as in a freshly built engine (the measured step
        # costs are kept: a serving engine has them warm)
        spec._idle_pause, spec._idle_next, spec._steps = 0, 1, 0
        spec._decided, spec.shadow_due = None, False
        spec._shadow.clear()


def generate(eng: Engine, prompts: list[list[int]], tokens: int) -> tuple[list, dict]:
    """Greedy run of ``prompts``; returns (outputs, timing). Timing is the decode phase: from the
    step after every request has its first token until all are done."""
    params = SamplingParams(temperature=0.0, max_tokens=tokens, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in prompts]
    got: dict[str, list[int]] = {i: [] for i in ids}
    while any(not got[i] for i in ids):  # prefill (and the first token of each request)
        for o in eng.step():
            got[o.request_id].extend(o.new_token_ids)
    first = sum(len(v) for v in got.values())
    steps0 = eng.runner.timings.steps
    t0 = time.perf_counter()
    while eng.has_unfinished():
        for o in eng.step():
            got[o.request_id].extend(o.new_token_ids)
    dt = time.perf_counter() - t0
    decoded = sum(len(v) for v in got.values()) - first
    per_seq = decoded / len(prompts)
    timing = {
        "decode_s": dt,
        "decode_tokens": decoded,
        "steps": eng.runner.timings.steps - steps0,
        "ms_per_token": dt / per_seq * 1e3 if per_seq else float("nan"),
        "tokens_per_s": decoded / dt if dt else float("nan"),
    }
    return [got[i] for i in ids], timing


def run_mode(sw: ModeSwitch, mode: str, prompts, tokens: int, proposer_fn, pass_ids: bool):
    """One run in ``mode``; returns (outputs, record with timing and spec counts)."""
    spec = sw.spec
    proposer = proposer_fn() if mode != "plain" else None
    sw.set(mode, proposer, pass_ids)
    probes0, hits0 = spec.shadow_probes, spec.shadow_hits
    errors0 = spec.proposer_errors
    rejections = [0]  # verified rows with a rejected draft (the per-token acceptance estimate)
    record = spec.record

    def counting(drafts, accepted, ids):
        rejections[0] += sum(a < d for a, d in zip(accepted, drafts, strict=True))
        record(drafts, accepted, ids)

    spec.record = counting
    try:
        outs, rec = generate(sw.eng, prompts, tokens)
    finally:
        del spec.record  # back to the class method
    m = spec.metrics.total
    rec |= {
        "drafted_tokens": int(m.num_draft_tokens),
        "accepted_tokens": int(m.num_accepted_tokens),
        "verified_drafts": int(m.num_drafts),
        "acceptance_rate": m.acceptance_rate,
        "mean_accepted_length": m.mean_accepted_length,
        # accepted / (accepted + rejections): the per-draft probability the adaptive model uses
        "per_token_acceptance": m.num_accepted_tokens / (m.num_accepted_tokens + rejections[0])
        if m.num_accepted_tokens + rejections[0]
        else 0.0,
        "shadow_probes": spec.shadow_probes - probes0,
        "shadow_hits": spec.shadow_hits - hits0,
        "proposer_errors": spec.proposer_errors - errors0,
    }
    if isinstance(proposer, OracleProposer) and proposer.proposed:
        rec["oracle_corrupted_share"] = proposer.corrupted / proposer.proposed
    if mode == "plain" and (rec["drafted_tokens"] or rec["shadow_probes"]):
        raise RuntimeError(f"plain mode drafted or probed: {rec}")  # the mode switch failed
    if mode == "adaptive":
        rec["final_acceptance_estimate"] = spec.adaptive.acceptance_rate
    sw.set("plain", None, False)  # leave the engine plain between runs
    return outs, rec


def paired_interval(ratios: list[float]) -> dict:
    """Geometric mean of paired ratios and its 95% t interval (on log ratios)."""
    logs = [math.log(r) for r in ratios]
    mean = statistics.fmean(logs)
    out = {"per_repeat": ratios, "median": statistics.median(ratios), "geomean": math.exp(mean)}
    if len(logs) < 2:
        out["ci95"] = [float("nan"), float("nan")]
    else:
        half = _T975.get(len(logs) - 1, 1.96) * statistics.stdev(logs) / len(logs) ** 0.5
        out["ci95"] = [math.exp(mean - half), math.exp(mean + half)]
    return out


def divergence(a: list[list[int]], b: list[list[int]]) -> dict:
    """Rows whose outputs differ and the first differing position of each."""
    rows = {}
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            n = min(len(x), len(y))
            rows[str(i)] = next((j for j in range(n) if x[j] != y[j]), n)
    return {"identical": not rows, "differing_rows": len(rows), "first_divergence": rows}


def measure_point(
    sw: ModeSwitch,
    prompts: list[list[int]],
    tokens: int,
    proposer_fn: Callable[[int], Proposer],
    pass_ids: bool,
    baseline: list[list[int]],
    repeats: int,
    warmup: int,
    noise: float,
) -> dict:
    """Paired ABC/CBA rounds of the three modes on ``prompts``; ``baseline``: the plain greedy
    outputs that every run's outputs are compared with."""
    runs: dict[str, list[dict]] = {m: [] for m in MODES}
    lossless: dict[str, list[dict]] = {m: [] for m in MODES}
    for rep in range(-warmup, repeats):
        order = MODES if rep % 2 == 0 else MODES[::-1]
        for mode in order:
            outs, rec = run_mode(sw, mode, prompts, tokens, lambda r=rep: proposer_fn(r), pass_ids)
            div = divergence(baseline, outs)
            rec["identical_to_plain_reference"] = div["identical"]
            lossless[mode].append(div)
            if rep >= 0:
                runs[mode].append(rec)
    ms = {m: [r["ms_per_token"] for r in runs[m]] for m in MODES}
    modes = {}
    for m in MODES:
        modes[m] = {
            "median_ms_per_token": statistics.median(ms[m]),
            "ms_per_token": ms[m],
            "median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs[m]),
            "runs": runs[m],
        }
        if m != "plain":
            for key in ("drafted_tokens", "accepted_tokens", "shadow_probes"):
                modes[m][f"{key}_per_run"] = [r[key] for r in runs[m]]
            drafted = sum(r["drafted_tokens"] for r in runs[m])
            accepted = sum(r["accepted_tokens"] for r in runs[m])
            modes[m]["acceptance_rate"] = accepted / drafted if drafted else 0.0
    best = "plain" if modes["plain"]["median_ms_per_token"] <= modes["fixed"][
        "median_ms_per_token"] else "fixed"  # fmt: skip
    ratios = {
        f"adaptive/{b}": paired_interval(
            [a / x for a, x in zip(ms["adaptive"], ms[b], strict=True)]
        )
        for b in ("plain", "fixed")
    }
    ratios["fixed/plain"] = paired_interval(
        [a / x for a, x in zip(ms["fixed"], ms["plain"], strict=True)]
    )
    ab = ratios[f"adaptive/{best}"]
    high = ab["ci95"][1]
    ok = (not math.isnan(high) and high <= 1 + noise) or ab["median"] <= 1.0
    all_identical = all(d["identical"] for m in MODES for d in lossless[m])
    return {
        "modes": modes,
        "ratios_ms_per_token": ratios,  # < 1: the first mode is faster
        "verdict": {
            "better_of_plain_and_fixed": best,
            "adaptive_over_best": ab,
            "noise": noise,
            "adaptive_at_least_as_fast_as_best": bool(ok),
        },
        "lossless": {
            "all_outputs_identical": all_identical,
            **{m: lossless[m] for m in MODES},
        },
        "drafts_exist": all(r["drafted_tokens"] > 0 for m in ("fixed",) for r in runs[m]),
    }


def point_line(row: dict) -> str:
    md, v = row["modes"], row["verdict"]
    ab = v["adaptive_over_best"]
    ms = " ".join(f"{m} {md[m]['median_ms_per_token']:.3f}" for m in MODES)
    return (
        f"{row['workload']} r={row.get('r', '-')} b{row['batch']}: ms/tok {ms}; "
        f"adaptive/{v['better_of_plain_and_fixed']} {ab['median']:.4f} "
        f"[{ab['ci95'][0]:.4f}, {ab['ci95'][1]:.4f}] ok={v['adaptive_at_least_as_fast_as_best']};"
        f" drafted fixed {md['fixed']['drafted_tokens_per_run']}"
        f" adaptive {md['adaptive']['drafted_tokens_per_run']};"
        f" acceptance fixed {md['fixed']['acceptance_rate']:.3f}"
        f" adaptive {md['adaptive']['acceptance_rate']:.3f};"
        f" probes {md['adaptive']['shadow_probes_per_run']};"
        f" identical={row['lossless']['all_outputs_identical']}"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=None, help="result folder (default bench/out)")
    ap.add_argument("--model", default=None, help=f"default {MODEL} ({TINY} with --tiny)")
    ap.add_argument("--tiny", action="store_true", help=f"{TINY}: a CPU smoke test in seconds")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default=None, help="default bfloat16 (float32 on the CPU)")
    ap.add_argument("--quick", action="store_true", help="batch 1, fewer points and repeats")
    ap.add_argument("--k", type=int, default=4, help="fixed k (and adaptive k_max)")
    ap.add_argument("--tokens", type=int, default=None, help="output tokens per request (128)")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--batches", default=None, help="comma-separated (default 1,8)")
    ap.add_argument("--rates", default=None, help="oracle corruption rates (0,0.5,0.8,0.95)")
    ap.add_argument("--repeats", type=int, default=None, help="paired rounds (default 3)")
    ap.add_argument("--warmup", type=int, default=None, help="discarded rounds (default 1)")
    ap.add_argument("--noise", type=float, default=0.01, help="verdict tolerance on the ratio")
    ap.add_argument("--workloads", default="oracle,ngram_rewrite,ngram_loop")
    ap.add_argument("--allow-mismatch", action="store_true", help="exit 0 on output mismatch")
    args = ap.parse_args()

    model = args.model or (TINY if args.tiny else MODEL)
    cpu = args.device == "cpu"
    dtype = args.dtype or ("float32" if cpu else "bfloat16")
    q = args.quick
    tokens = args.tokens or (32 if args.tiny else 64 if q else 128)
    batches = [int(b) for b in (args.batches or ("1" if q else "1,8")).split(",")]
    rates = [float(r) for r in (args.rates or ("0.0,0.8" if q else "0.0,0.5,0.8,0.95")).split(",")]
    repeats = args.repeats or (2 if q else 3)
    warmup = args.warmup if args.warmup is not None else (0 if q else 1)
    workloads = args.workloads.split(",")
    if q and args.workloads == ap.get_default("workloads"):
        workloads = ["oracle", "ngram_rewrite"]
    plen, k = args.prompt_len, args.k

    t_start = time.perf_counter()
    eng = Engine(
        model=model,
        device=args.device,
        dtype=dtype,
        max_model_len=max(1024, 3 * plen + 3 * tokens + 2 * k),
        max_num_seqs=max(batches),
        max_num_batched_tokens=8192,
        speculative_method="ngram",
        num_speculative_tokens=k,
        adaptive_speculation=True,  # the engine default; each mode sets spec.adaptive itself
    )
    startup = time.perf_counter() - t_start
    sw = ModeSwitch(eng)
    cfg = eng.config
    vocab = eng.vocab_size
    log(f"engine {model} {dtype} on {eng.resolved.device}: {startup:.1f}s")

    def ngram():
        return NgramProposer(k=k, min_n=cfg.ngram_min, max_n=cfg.ngram_max)

    res: dict = {
        "model": model,
        "dtype": dtype,
        "k": k,
        "tokens": tokens,
        "prompt_len": plen,
        "batches": batches,
        "oracle_rates": rates,
        "repeats": repeats,
        "warmup_rounds": warmup,
        "noise": noise_note(args.noise),
        "engine": {
            "startup_s": startup,
            "device": str(eng.resolved.device),
            "cuda_graphs": getattr(eng.runner, "graphs", None) is not None,
            "execution": type(eng._execution).__name__,
            "ngram": [cfg.ngram_min, cfg.ngram_max],
            "kernels": eng.stats()["kernels"],
            "verification_kernel": eng.spec.stats()["verification_kernel"],
        },
        "method": (
            "one engine; plain = NoSpeculation hooks, fixed = k every step, adaptive = fresh "
            "AdaptiveK per run (measured step costs kept warm); per point a plain reference "
            "run, warm-up rounds, then paired ABC/CBA rounds; ms per output token = decode "
            "phase seconds / decoded tokens per sequence"
        ),
        "points": [],
    }
    rng = np.random.default_rng(0)
    for batch in batches:
        for wl in workloads:
            if wl == "oracle":
                prompts = [rng.integers(0, vocab, size=plen).tolist() for _ in range(batch)]
                base, _ = generate_plain(sw, prompts, tokens)
                # drafts follow the plain reference; if verification's rounding (windows of k + 1
                # tokens) makes the speculative greedy output differ, follow that one instead so
                # the corruption rate still controls acceptance (recorded)
                ref = {tuple(p): p + o for p, o in zip(prompts, base, strict=True)}
                spec_out, _ = run_mode(
                    sw, "fixed", prompts, tokens,
                    lambda ref=ref: OracleProposer(ref, plen, 0.0, vocab, 0), False,
                )  # fmt: skip
                ref_div = divergence(base, spec_out)
                if not ref_div["identical"]:
                    ref = {tuple(p): p + o for p, o in zip(prompts, spec_out, strict=True)}
                for r in rates:

                    def oracle(rep, r=r, ref=ref):
                        return OracleProposer(ref, plen, r, vocab, seed=1000 + rep)

                    row = measure_point(
                        sw, prompts, tokens, oracle, False, base, repeats, warmup, args.noise
                    )
                    row = {"workload": "oracle", "r": r, "batch": batch, **row}
                    row["reference_spec_vs_plain"] = ref_div
                    finish(res, row, args.out)
            else:
                if wl == "ngram_rewrite":
                    texts = [rng.integers(0, vocab, size=plen).tolist() for _ in range(batch)]
                    conts, _ = generate_plain(sw, texts, tokens)
                    prompts = [p + c + p for p, c in zip(texts, conts, strict=True)]
                elif wl == "ngram_loop":
                    prompts = [rng.integers(0, vocab, size=plen).tolist() for _ in range(batch)]
                else:
                    raise SystemExit(f"unknown workload {wl}")
                base, _ = generate_plain(sw, prompts, tokens)
                row = measure_point(
                    sw, prompts, tokens, lambda rep: ngram(), True, base, repeats, warmup,
                    args.noise,
                )  # fmt: skip
                row = {"workload": wl, "batch": batch, "prompt_tokens": len(prompts[0]), **row}
                finish(res, row, args.out)

    pts = res["points"]
    res["all_outputs_identical"] = all(p["lossless"]["all_outputs_identical"] for p in pts)
    res["adaptive_at_least_as_fast_everywhere"] = all(
        p["verdict"]["adaptive_at_least_as_fast_as_best"] for p in pts
    )
    res["summary"] = [summary_row(p) for p in pts]
    res["wall_s"] = time.perf_counter() - t_start
    path = write_result(NAME, res, args.out)
    log(f"wrote {path} ({res['wall_s']:.0f}s)")
    log(
        f"all outputs identical: {res['all_outputs_identical']}; adaptive at least as fast as "
        f"the better of plain and fixed everywhere: {res['adaptive_at_least_as_fast_everywhere']}"
    )
    if not res["all_outputs_identical"] and not args.allow_mismatch:
        log("greedy outputs differed between modes (see points[].lossless): exit 3")
        sys.exit(3)


def noise_note(noise: float) -> dict:
    return {
        "value": noise,
        "rule": "adaptive at least as fast as best(plain, fixed) when the 95% interval's upper "
        "end of the paired ratio adaptive/best is <= 1 + noise, or its median is <= 1",
    }


def generate_plain(sw: ModeSwitch, prompts, tokens):
    return run_mode(sw, "plain", prompts, tokens, None, False)


def summary_row(p: dict) -> dict:
    md, v = p["modes"], p["verdict"]
    return {
        "workload": p["workload"],
        "r": p.get("r"),
        "batch": p["batch"],
        "plain_ms": md["plain"]["median_ms_per_token"],
        "fixed_ms": md["fixed"]["median_ms_per_token"],
        "adaptive_ms": md["adaptive"]["median_ms_per_token"],
        "adaptive_over_plain": p["ratios_ms_per_token"]["adaptive/plain"]["median"],
        "adaptive_over_fixed": p["ratios_ms_per_token"]["adaptive/fixed"]["median"],
        "best": v["better_of_plain_and_fixed"],
        "adaptive_over_best_ci95": v["adaptive_over_best"]["ci95"],
        "ok": v["adaptive_at_least_as_fast_as_best"],
        "fixed_acceptance": md["fixed"]["acceptance_rate"],
        "adaptive_acceptance": md["adaptive"]["acceptance_rate"],
        "adaptive_drafted": md["adaptive"]["drafted_tokens_per_run"],
        "adaptive_shadow_probes": md["adaptive"]["shadow_probes_per_run"],
        "identical": p["lossless"]["all_outputs_identical"],
    }


def finish(res: dict, row: dict, out) -> None:
    res["points"].append(row)
    log(point_line(row))
    write_result(NAME, res, out)  # partial results survive a time-out


if __name__ == "__main__":
    main()
