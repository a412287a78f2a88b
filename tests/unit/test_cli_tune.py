"""`layerzero-serve tune` end to end on the CPU with a tiny model: the installed entry point (run
outside the repository root) writes a table a fresh selector then uses; in process, with fake
sampling kernels, the measured-faster one is what a fresh selector picks; bad options are
errors naming the option."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from layerzero_serve._cli import main
from layerzero_serve.kernels.registry import all_specs
from layerzero_serve.kernels.spec import KernelSpec, Op
from layerzero_serve.selection import (
    BackendState,
    PolicyState,
    Selector,
    apply_device_timings,
    explain,
    probe_device,
    read_table,
    set_selector,
)

TINY = ["--model", "dummy:tiny", "--max-num-seqs", "4", "--device", "cpu"]
FAST = ["--reps", "2", "--warmup", "1", "--quiet"]


@pytest.fixture(autouse=True)
def _clean(monkeypatch, tmp_path):
    for var in ("LZ_TIMING_TABLE", "LZ_TUNE_AT_STARTUP", "LZ_KERNEL_POLICY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("LZ_TIMING_DIR", str(tmp_path / "default-dir"))
    set_selector(None)
    yield
    set_selector(None)


def _entry_point() -> str:
    exe = Path(sys.executable).with_name("layerzero-serve")
    if not exe.exists():
        pytest.skip("the layerzero-serve entry point is not installed next to this python")
    return str(exe)


def test_installed_cli_writes_a_table_a_fresh_selector_uses(tmp_path):
    table = tmp_path / "tables" / "cpu.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LZ_TIMING")}
    out = subprocess.run(
        [_entry_point(), "tune", *TINY, *FAST, "--table-path", str(table)],
        cwd=tmp_path,  # not the repository root
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    assert f"table: {table}" in out.stdout and "fastest per op:" in out.stdout
    assert "attention_decode: torch.paged_decode" in out.stdout
    assert "rmsnorm: no synthetic inputs" in out.stdout
    doc = json.loads(table.read_text())
    assert doc["fingerprint"]["device_type"] == "cpu"
    assert {"torch.paged_decode", "torch.sampler", "torch.kv_write"} <= set(doc["entries"])

    sel = Selector()
    assert "fingerprint matches" in apply_device_timings(sel, probe_device("cpu"), table)
    from layerzero_serve.selection import ModelShape, model_plans

    shape = ModelShape("float32", 16, 4, 2, 512)  # dummy:tiny
    decode = next(
        p for p in model_plans(probe_device("cpu"), shape, 16, 4) if p.op is Op.ATTN_DECODE
    )
    rep = explain(decode, sel)
    chosen = next(c for c in rep.choice.candidates if c.chosen)
    assert chosen.median_s > 0 and chosen.p95_s >= chosen.median_s
    assert "median" in rep.text() and str(table) in rep.text()


class _Sleeper:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def sample(self, probs, top_k, top_p, min_p, seed, offset):
        time.sleep(self.seconds)
        return probs.argmax(-1)


def _fake_selector() -> Selector:
    """The real catalogue with two fake CPU sampling kernels instead of torch's (which may be
    faster than either): the slow one has the higher static priority."""
    specs = [
        *(s for s in all_specs() if s.name != "torch.sampler"),
        KernelSpec("slow.sample", Op.SAMPLING, "slow", priority=500, device_types=["cpu"],
                   factory=lambda ctx: _Sleeper(0.005)),
        KernelSpec("fast.sample", Op.SAMPLING, "fast", priority=1, device_types=["cpu"],
                   factory=lambda ctx: _Sleeper(0.0005)),
    ]  # fmt: skip
    ok = BackendState(True, "1.0", "")
    import torch

    backends = {"torch": BackendState(True, torch.__version__, ""), "slow": ok, "fast": ok}
    return Selector(specs=specs, backends=backends, policy=PolicyState())


def test_tune_in_process_makes_the_measured_faster_kernel_win(tmp_path, capsys):
    table = tmp_path / "t.json"
    set_selector(_fake_selector())
    assert main(["tune", *TINY, *FAST, "--ops", "sampling", "--table-path", str(table)]) == 0
    out = capsys.readouterr().out
    assert "sampling: fast.sample" in out and "attention_decode: not among the ops" in out
    entries = read_table(table).entries
    fast = next(iter(entries["fast.sample"].values()))
    slow = next(iter(entries["slow.sample"].values()))
    assert fast.median_s < slow.median_s

    fresh = _fake_selector()  # a new process would build the same registry
    apply_device_timings(fresh, probe_device("cpu"), table)
    names = {c.name for c in fresh.kernels(Op.SAMPLING)}
    assert {"fast.sample", "slow.sample"} <= names
    from layerzero_serve.kernels.spec import KernelContext

    ctx = KernelContext(Op.SAMPLING, device_type="cpu", sm=0, generation="cpu",
                        dtype="float32", head_dim=16, num_q_heads=4, num_kv_heads=2,
                        batch_bucket=4, vocab_size=512)  # fmt: skip
    choice = fresh.select(Op.SAMPLING, ctx)
    assert choice.name == "fast.sample" and choice.by_measurement

    # a second run keeps what is measured; --force measures again
    assert main(["tune", *TINY, *FAST, "--ops", "sampling", "--table-path", str(table)]) == 0
    assert "0 measured now, 2 kept" in capsys.readouterr().out
    args = ["tune", *TINY, *FAST, "--ops", "sampling", "--table-path", str(table), "--force"]
    assert main(args) == 0
    assert "2 measured now, 0 kept" in capsys.readouterr().out


def test_explain_shows_the_times_tune_measured(tmp_path, capsys):
    """No --table-path: the device's file under LZ_TIMING_DIR, which `explain` then reads."""
    assert main(["tune", *TINY, *FAST, "--ops", "attention_decode"]) == 0
    assert str(tmp_path / "default-dir") in capsys.readouterr().out
    set_selector(None)  # a fresh process-wide selector, as in a new process
    assert main(["explain", "--model", "dummy:tiny", "--batch", "4"]) == 0
    out = capsys.readouterr().out
    assert f"timings: {tmp_path / 'default-dir'}" in out and "fingerprint matches" in out
    assert "* torch.paged_decode" in out and "; median " in out and ", p95 " in out


@pytest.mark.parametrize(
    "extra, option",
    [
        (["--reps", "-1"], "--reps"),
        (["--warmup", "-5"], "--warmup"),
        (["--ops", "attention_decode,bogus"], "--ops"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_options_are_errors_naming_the_option(tmp_path, capsys, extra, option):
    assert main(["tune", *TINY, "--table-path", str(tmp_path / "t.json"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {option}=") and "allowed:" in err
    assert not (tmp_path / "t.json").exists()


def test_unwritable_table_path_is_an_error_before_anything_runs(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["tune", *TINY, "--table-path", str(blocker / "t.json")]) == 2
    captured = capsys.readouterr()
    assert "--table-path=" in captured.err and "not a writable folder" in captured.err
    assert captured.out == ""  # rejected before the device and model lines


def test_tune_help_lists_its_options(capsys):
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    out = capsys.readouterr().out
    for opt in ("--model", "--dtype", "--max-num-seqs", "--buckets", "--reps", "--table-path",
                "--force", "--ops"):  # fmt: skip
        assert opt in out
    assert "(default: default)" in out and "(default: 20)" in out


def test_progress_falls_back_from_tqdm_to_rich_to_plain_lines(monkeypatch, capsys):
    from layerzero_serve.selection import TuneProgress

    monkeypatch.setitem(sys.modules, "tqdm", None)  # "not installed": the import raises
    monkeypatch.setitem(sys.modules, "rich.progress", None)
    progress = TuneProgress(quiet=False)
    progress(1, 2, "sampling batch 4 torch.sampler")
    progress(2, 2, "kv_write batch 4 torch.kv_write")
    progress.close()
    err = capsys.readouterr().err
    assert "[1/2] sampling batch 4 torch.sampler" in err and "[2/2] kv_write" in err
    quiet = TuneProgress(quiet=True)
    quiet(1, 1, "x")
    assert capsys.readouterr().err == ""
