"""Smoke tests of two GPU bench scripts, run on the CPU: bench/plot_race.py on a synthetic race
JSON (summary numbers from known medians, missing keys skipped), and
bench/bench_spec_adaptive_gpu.py on a tiny dummy model (--quick, about 5 s). Subprocesses with
the script's absolute path and cwd=tmp_path (never from the repository root)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench"

RACE = {
    "device": "synthetic",
    "torch": "x",
    "copy_bw_GBps_ours": 2000.0,
    "copy_bw_GBps_gptfast": 3000.0,  # the largest one sets the roofline
    "ours_weight_bytes": 15_000_000_000,
    "ours_b1_ctx128_greedy_ms": [6.0, 6.2, 9.0],
    "ours_b1_ctx128_t0.8k200_ms": [7.0, 7.5, 7.2],
    "gptfast_b1_ctx128_ms": [6.0, 6.4, 6.1],
    "ours_b64_ctx2048_greedy_ms": [12.0],
    "oursamp_b1_ctx128_greedy_ms": [6.0, 6.0],
    "oursamp_b1_ctx128_t0.8_k200_ms": [7.5, 7.5],
    # missing: ours/gptfast at ctx 2048 batch 1, gptfast at batch 64
}


def _run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def test_plot_race_summary_from_known_medians(tmp_path):
    (tmp_path / "sbs.json").write_text(json.dumps(RACE))
    got = _run([str(BENCH / "plot_race.py"), "sbs.json", "out"], tmp_path, 60)
    assert got.returncode == 0, got.stderr
    out = tmp_path / "out"
    s = json.loads((out / "race_summary.json").read_text())
    assert s["roofline_bandwidth_GBps"] == 3000.0
    pts = {p["key"]: p for p in s["points"]}
    assert pts["ours_b1_ctx128_greedy_ms"]["median_ms"] == 6.2
    assert pts["gptfast_b1_ctx128_ms"]["sampling"] == "t0.8k200"
    same = [r for r in s["ratios"] if r["same_sampling"]]
    assert len(same) == 1 and same[0]["batch"] == 1 and same[0]["ctx"] == 128
    assert math.isclose(same[0]["ours_over_gptfast"], 7.2 / 6.1)
    # roofline: (weights + 64 * 2048 * 32 * 8 * 128 * 2 * 2 bytes of KV) / 3000 GB/s
    p64 = pts["ours_b64_ctx2048_greedy_ms"]
    floor = (15e9 + 64 * 2048 * 32 * 8 * 128 * 4) / 3000e9 * 1e3
    assert math.isclose(p64["roofline_ms"], floor)
    assert math.isclose(p64["fraction_of_roofline"], floor / 12.0)
    sweep = {r["case"]: r for r in s["sampling_sweep"]}
    assert math.isclose(sweep["t0.8_k200"]["over_greedy"], 1.25)
    assert any("gptfast b64 ctx2048" in m for m in s["skipped"])
    md = (out / "race_table.md").read_text()
    assert "| 1 | 128 |" in md and "1.180" in md and "Skipped:" in md
    assert (out / "race.png").exists() or "matplotlib is not installed" in got.stdout


def test_plot_race_without_bandwidth_or_points(tmp_path):
    (tmp_path / "sbs.json").write_text("{}")
    got = _run([str(BENCH / "plot_race.py"), "sbs.json", "out"], tmp_path, 60)
    assert got.returncode == 0, got.stderr
    s = json.loads((tmp_path / "out" / "race_summary.json").read_text())
    assert s["points"] == [] and s["roofline_bandwidth_GBps"] is None
    assert any("copy_bw" in m for m in s["skipped"])


def test_bench_spec_adaptive_tiny_cpu(tmp_path):
    args = [str(BENCH / "bench_spec_adaptive_gpu.py"), "--device", "cpu", "--tiny", "--quick"]
    got = _run([*args, "--out", str(tmp_path)], tmp_path, 300)
    assert got.returncode == 0, got.stdout[-2000:] + got.stderr[-2000:]
    res = json.loads((tmp_path / "spec_adaptive_gpu.json").read_text())
    assert res["all_outputs_identical"] is True
    assert {p["workload"] for p in res["points"]} == {"oracle", "ngram_rewrite"}
    for p in res["points"]:
        assert p["drafts_exist"]  # fixed k drafted in every run
        assert set(p["modes"]) == {"plain", "fixed", "adaptive"}
        assert isinstance(p["verdict"]["adaptive_at_least_as_fast_as_best"], bool)
        assert all(r["drafted_tokens"] == 0 for r in p["modes"]["plain"]["runs"])
    r0 = next(p for p in res["points"] if p.get("r") == 0.0)
    assert r0["modes"]["fixed"]["acceptance_rate"] == 1.0  # uncorrupted oracle drafts
