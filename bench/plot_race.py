"""Summarise the peer race (this project's Engine vs gpt-fast, the device's
``peers/side_by_side.py``): medians, same-run ratios ours / gpt-fast, the memory roofline per
point and the fraction of it reached; writes ``race_summary.json``, ``race_table.md`` and (when
matplotlib is installed) ``race.png``.

    python bench/plot_race.py IN_JSON OUT_DIR

Roofline per point: (weight bytes + KV bytes) / measured copy bandwidth, where the weight bytes
are ``ours_weight_bytes`` (the Llama-3-8B shape without the embedding table when absent) and the
KV bytes of a batch are batch x ctx x 32 layers x 8 KV heads x 128 x 2 (K, V) x 2 bytes (bf16),
ctx being the prompt length. The copy bandwidth is the largest ``copy_bw_GBps_*`` of the file
(each harness part measures its own). gpt-fast samples with temperature 0.8 and top-k 200; a
ratio is marked ``same_sampling`` when ours ran the same sampling. Missing keys are skipped and
listed under ``skipped``.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import sys
from pathlib import Path

# Llama-3-8B shape
LAYERS, KV_HEADS, HEAD_DIM, BYTES = 32, 8, 128, 2
HIDDEN, INTER, HEADS, VOCAB = 4096, 14336, 32, 128256
GPTFAST_SAMPLING = "t0.8k200"  # side_by_side.py's gptfast(): temperature=0.8, top_k=200
# the points side_by_side.py's ours / gptfast / gptfast64 parts write
EXPECTED = [
    ("ours", 1, 128, "greedy"),
    ("ours", 1, 128, "t0.8k200"),
    ("ours", 1, 2048, "greedy"),
    ("ours", 1, 2048, "t0.8k200"),
    ("ours", 64, 2048, "greedy"),
    ("gptfast", 1, 128, GPTFAST_SAMPLING),
    ("gptfast", 1, 2048, GPTFAST_SAMPLING),
    ("gptfast", 64, 2048, GPTFAST_SAMPLING),
]
KEY = re.compile(
    r"^(?P<system>[A-Za-z0-9_.]+?)_b(?P<batch>\d+)_ctx(?P<ctx>\d+)(?:_(?P<case>.+))?_ms$"
)
LABEL = {"greedy": "greedy", "t0.8k200": "T0.8 top-k200", "t0.8_k200": "T0.8 top-k200"}


def kv_bytes(ctx: int, batch: int) -> int:
    """KV cache bytes one decode step reads: ``batch`` sequences of ``ctx`` tokens."""
    return batch * ctx * LAYERS * KV_HEADS * HEAD_DIM * 2 * BYTES


def shape_weight_bytes() -> int:
    """Llama-3-8B weights read per decode step (the embedding table excluded: one row a token)."""
    kv = KV_HEADS * HEAD_DIM
    layer = 2 * HIDDEN * HIDDEN + 2 * HIDDEN * kv + 3 * HIDDEN * INTER + 2 * HIDDEN
    return (LAYERS * layer + HIDDEN + VOCAB * HIDDEN) * BYTES


def _median(value) -> tuple[float | None, list[float]]:
    """Median of a list of repeats (or of one number); None when there is no finite number."""
    vals = value if isinstance(value, list) else [value]
    nums = [float(v) for v in vals if isinstance(v, (int, float)) and not isinstance(v, bool)]
    nums = [v for v in nums if math.isfinite(v) and v > 0]
    return (statistics.median(nums) if nums else None), nums


def summarise(doc: dict) -> dict:
    skipped: list[str] = []
    bws = {
        k.removeprefix("copy_bw_GBps_"): float(v)
        for k, v in doc.items()
        if k.startswith("copy_bw_GBps_") and isinstance(v, (int, float)) and v > 0
    }
    bw = max(bws.values()) * 1e9 if bws else None
    if bw is None:
        skipped.append("no copy_bw_GBps_* key: no roofline")
    wb = doc.get("ours_weight_bytes")
    weight_source = "ours_weight_bytes"
    if not isinstance(wb, (int, float)) or wb <= 0:
        wb, weight_source = shape_weight_bytes(), "Llama-3-8B shape (ours_weight_bytes missing)"
        skipped.append("ours_weight_bytes missing: weights from the Llama-3-8B shape")

    points = []
    for key, value in sorted(doc.items()):
        m = KEY.match(key)
        if not m:
            continue
        system, case = m["system"], m["case"]
        if system == "gptfast":
            case = case or GPTFAST_SAMPLING
        batch, ctx = int(m["batch"]), int(m["ctx"])
        med, reps = _median(value)
        if med is None:
            skipped.append(f"{key}: no numeric repeats")
            continue
        p = {
            "key": key,
            "system": system,
            "batch": batch,
            "ctx": ctx,
            "sampling": case,
            "median_ms": med,
            "repeats_ms": reps,
        }
        if bw is not None:
            floor = (wb + kv_bytes(ctx, batch)) / bw * 1e3
            p |= {
                "roofline_ms": floor,
                "fraction_of_roofline": floor / med,
                "x_roofline": med / floor,
            }
        points.append(p)
    have = {(p["system"], p["batch"], p["ctx"], p["sampling"]) for p in points}
    for system, batch, ctx, case in EXPECTED:
        if (system, batch, ctx, case) not in have:
            skipped.append(f"{system} b{batch} ctx{ctx} {case}: missing, skipped")

    def find(system, batch, ctx, case):
        return next(
            (p for p in points if (p["system"], p["batch"], p["ctx"], p["sampling"]) ==
             (system, batch, ctx, case)),
            None,
        )  # fmt: skip

    ratios = []
    for g in (p for p in points if p["system"] == "gptfast"):
        for case in ("t0.8k200", "greedy"):
            o = find("ours", g["batch"], g["ctx"], case)
            if o is None:
                continue
            ratios.append(
                {
                    "batch": g["batch"],
                    "ctx": g["ctx"],
                    "ours_sampling": case,
                    "gptfast_sampling": g["sampling"],
                    "same_sampling": case == g["sampling"],
                    "ours_ms": o["median_ms"],
                    "gptfast_ms": g["median_ms"],
                    "ours_over_gptfast": o["median_ms"] / g["median_ms"],
                }
            )
    sweep = []
    for p in points:
        if p["system"].startswith("oursamp"):
            base = find(p["system"], p["batch"], p["ctx"], "greedy")
            sweep.append(
                {
                    "system": p["system"],
                    "batch": p["batch"],
                    "ctx": p["ctx"],
                    "case": p["sampling"],
                    "median_ms": p["median_ms"],
                    "over_greedy": p["median_ms"] / base["median_ms"] if base else None,
                }
            )
    return {
        "device": doc.get("device"),
        "torch": doc.get("torch"),
        "copy_bandwidth_GBps": bws,
        "roofline_bandwidth_GBps": bw / 1e9 if bw else None,
        "weight_bytes": wb,
        "weight_bytes_source": weight_source,
        "kv_bytes_rule": "batch * ctx * 32 * 8 * 128 * 2 (K,V) * 2 bytes, ctx = prompt length",
        "points": points,
        "ratios": ratios,
        "sampling_sweep": sweep,
        "skipped": skipped,
    }


def _fmt(x, spec=".2f") -> str:
    return "-" if x is None else format(x, spec)


def table(s: dict) -> str:
    """Markdown for the README: one row per (batch, ctx) of the race, then the sampling sweep."""
    pts = {(p["system"], p["batch"], p["ctx"], p["sampling"]): p for p in s["points"]}
    keys = sorted({(b, c) for (sy, b, c, _) in pts if sy in ("ours", "gptfast")})
    lines = [
        f"Device: {s['device'] or '?'}, torch {s['torch'] or '?'}; "
        + (
            f"roofline = (weights {s['weight_bytes'] / 1e9:.2f} GB + KV) / "
            f"{s['roofline_bandwidth_GBps']:.0f} GB/s measured copy bandwidth. "
            if s["roofline_bandwidth_GBps"]
            else "no copy bandwidth measured: no roofline. "
        )
        + "ms per decode step (= ms per token per sequence), medians of the repeats; gpt-fast "
        "samples with T 0.8, top-k 200.",
        "",
        "| batch | ctx | ours greedy ms | ours T0.8 top-k200 ms | gpt-fast ms | ours/gpt-fast "
        "(same sampling) | roofline ms | % of roofline: ours greedy | ours T0.8 top-k200 | "
        "gpt-fast |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for b, c in keys:
        og = pts.get(("ours", b, c, "greedy"))
        ot = pts.get(("ours", b, c, "t0.8k200"))
        g = pts.get(("gptfast", b, c, GPTFAST_SAMPLING))
        ratio = None
        note = ""
        if g and ot:
            ratio = ot["median_ms"] / g["median_ms"]
        elif g and og:
            ratio, note = og["median_ms"] / g["median_ms"], " (ours greedy)"
        any_p = og or ot or g
        roof = any_p.get("roofline_ms") if any_p else None

        def frac(p):
            return _fmt(100 * p["fraction_of_roofline"], ".1f") if p and "roofline_ms" in p else "-"

        lines.append(
            f"| {b} | {c} | {_fmt(og and og['median_ms'])} | {_fmt(ot and ot['median_ms'])} | "
            f"{_fmt(g and g['median_ms'])} | {_fmt(ratio, '.3f')}{note} | {_fmt(roof)} | "
            f"{frac(og)} | {frac(ot)} | {frac(g)} |"
        )
    if s["sampling_sweep"]:
        lines += [
            "",
            "Sampling cost (ours, ms per decode step, ctx 128):",
            "",
            "| run | batch | case | ms | / greedy |",
            "|---|---:|---|---:|---:|",
        ]
        for r in s["sampling_sweep"]:
            lines.append(
                f"| {r['system']} | {r['batch']} | {r['case']} | {r['median_ms']:.3f} | "
                f"{_fmt(r['over_greedy'], '.3f')} |"
            )
    if s["skipped"]:
        lines += ["", "Skipped: " + "; ".join(s["skipped"])]
    return "\n".join(lines) + "\n"


def _in_batch_panel(p: dict) -> bool:
    """The race's systems, and of the sampling sweep its greedy and T0.8 top-k200 cases."""
    sweep = p["system"].startswith("oursamp") and p["sampling"] in ("greedy", "t0.8_k200")
    return p["system"] in ("ours", "gptfast") or sweep


def _xy(pairs) -> tuple[list, list]:
    pairs = sorted(pairs)
    return [x for x, _ in pairs], [y for _, y in pairs]


def _name(system: str, case: str) -> str:
    return f"{'gpt-fast' if system == 'gptfast' else system} {LABEL.get(case, case)}"


def plot(s: dict, path: Path) -> str:
    """Two panels: ms vs ctx at batch 1, ms vs batch; roofline dashed. Returns a status line."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no race.png (the summary and the table have it all)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = s["points"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    race = [p for p in pts if p["system"] in ("ours", "gptfast") and p["batch"] == 1]
    for system, case in sorted({(p["system"], p["sampling"]) for p in race}):
        mine = [p for p in race if (p["system"], p["sampling"]) == (system, case)]
        ax1.plot(
            *_xy((p["ctx"], p["median_ms"]) for p in mine), marker="o", label=_name(system, case)
        )
    roof = {(p["ctx"], p["roofline_ms"]) for p in pts if p["batch"] == 1 and "roofline_ms" in p}
    if roof:
        ax1.plot(*_xy(roof), "k--", label="roofline: (weights + KV) / copy bandwidth")
    ax1.set(xscale="log", xlabel="context (prompt tokens)", ylabel="ms per decode step")
    ax1.set_title("batch 1")
    # batch panel: every context that has two or more batch sizes
    drawn = False
    for ctx in sorted({p["ctx"] for p in pts}):
        here = [p for p in pts if p["ctx"] == ctx and _in_batch_panel(p)]
        if len({p["batch"] for p in here}) < 2:
            continue
        for system, case in sorted({(p["system"], p["sampling"]) for p in here}):
            mine = [p for p in here if (p["system"], p["sampling"]) == (system, case)]
            xy = _xy((p["batch"], p["median_ms"]) for p in mine)
            ax2.plot(*xy, marker="o", label=f"{_name(system, case)} ctx{ctx}")
            drawn = True
        roof = {(p["batch"], p["roofline_ms"]) for p in here if "roofline_ms" in p}
        if roof:
            ax2.plot(*_xy(roof), "k--", alpha=0.6, label=f"roofline ctx{ctx}")
    if not drawn:
        ax2.text(0.5, 0.5, "no context with two batch sizes", ha="center", transform=ax2.transAxes)
    ax2.set(xscale="log", xlabel="batch", ylabel="ms per decode step")
    ax2.set_title("by batch")
    for ax, field in ((ax1, "ctx"), (ax2, "batch")):
        ticks = sorted({p[field] for p in pts})
        if ticks:
            ax.minorticks_off()
            ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.suptitle(f"Llama-3-8B shape, bf16 decode: ours vs gpt-fast ({s['device'] or '?'})")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return f"wrote {path}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("in_json", type=Path)
    ap.add_argument("out_dir", type=Path)
    args = ap.parse_args(argv)
    doc = json.loads(args.in_json.read_text())
    s = summarise(doc)
    s["source"] = str(args.in_json)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "race_summary.json").write_text(json.dumps(s, indent=2) + "\n")
    md = table(s)
    (args.out_dir / "race_table.md").write_text(md)
    print(md)  # (its last line lists the skipped points)
    print(plot(s, args.out_dir / "race.png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
