"""`layerzero-serve --help` is plain text with defaults, `--version` works, `doctor` on a CPU
describes the CPU, and `--fake-device` plans as that device would with this machine's
installed packages (the same kernels a real such device would get)."""

from __future__ import annotations

import json
from importlib.metadata import version

import pytest
import torch

import layerzero_serve.selection as selection
from layerzero_serve._cli import build_parser, main
from layerzero_serve.kernels import _backends
from layerzero_serve.kernels._backends import BackendStatus
from layerzero_serve.selection import (
    FAKE_DEVICES,
    _device,
    configure,
    explain,
    fake_device,
    reload_policy,
    set_selector,
)
from layerzero_serve.selection._selector import Selector

COMMANDS = ["demo", "generate", "doctor", "explain"]


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("LZ_KERNEL_POLICY", raising=False)
    set_selector(None)
    configure(reset=True)
    reload_policy()
    yield
    set_selector(None)
    configure(reset=True)


def _help(capsys, argv: list[str]) -> str:
    with pytest.raises(SystemExit) as ei:
        main([*argv, "--help"])
    assert ei.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("argv", [[], *([c] for c in COMMANDS)])
def test_help_is_plain_text(argv, capsys):
    out = _help(capsys, argv)
    assert "``" not in out and ":class:" not in out and ":func:" not in out


@pytest.mark.parametrize(
    "cmd, shown",
    [
        ("demo", ["--max-num-seqs MAX_NUM_SEQS", "(default: 256)", "(default: 32)"]),
        ("generate", ["(default: 64)", "(default: 2048)", "(default: auto)"]),
        ("doctor", ["(default: dummy:llama3-8b)", "(default: 16)", "(default: auto)"]),
        ("explain", ["(default: attention_decode)", "(default: 1)"]),
    ],
)
def test_help_shows_defaults(cmd, shown, capsys):
    out = " ".join(_help(capsys, [cmd]).split())  # argparse wraps lines
    for text in shown:
        assert text in out, text
    assert "(default: False)" not in out and "(default: None)" not in out


def test_version(capsys):
    with pytest.raises(SystemExit) as ei:
        main(["--version"])
    assert ei.value.code == 0
    assert capsys.readouterr().out.strip() == f"layerzero-serve {version('layerzero-serve')}"


def test_parser_still_requires_a_command(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([])


# ------------------------------------------------------------------ doctor on a CPU


def test_doctor_on_a_cpu_describes_the_cpu(capsys, monkeypatch):
    for module in (_device, selection):  # where the probe and doctor look them up
        monkeypatch.setattr(
            module, "probe_device", lambda device=None: _device._probe.__wrapped__(None)
        )
        monkeypatch.setattr(module, "cpu_name", lambda: "Test CPU 9000")
        monkeypatch.setattr(module, "host_memory", lambda root="/": (6 << 30, 16 << 30))
    assert main(["doctor", "--model", "dummy:tiny"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert "sm_0" not in first and "0.0/0.0" not in first
    assert first.startswith("device: CPU Test CPU 9000 (cpu, ")
    assert " cores)" in first and "memory 6.0/16.0 GiB available" in first
    assert main(["doctor", "--model", "dummy:tiny", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["host"]["cpu"] == "Test CPU 9000" and doc["host"]["memory_total"] == 16 << 30
    assert doc["device"]["total_memory"] == 16 << 30 and doc["fake_device"] is None


def test_explain_on_a_cpu_has_no_sm_0(capsys):
    assert main(["explain", "--fake-device", "cpu", "--model", "dummy:tiny"]) == 0
    out = capsys.readouterr().out
    assert "sm_0" not in out and "attention_decode: cpu, float32" in out


# ------------------------------------------------------------------ --fake-device


def _installed_here(name: str) -> bool:
    st = _backends.probe_backend(name)
    return st.available or "no CUDA device" in st.reason


def _real_gpu_selector(monkeypatch) -> Selector:
    """The selector a real GPU machine with this machine's packages would build: the backend
    probe run with CUDA reported available (the xformers probe, which launches a kernel, is
    taken as it is here)."""
    xformers = _backends.probe_backend("xformers")
    _backends.clear_probe_cache()
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        states = {
            name: xformers if name == "xformers" else _backends.probe_backend(name)
            for name in _backends.BACKENDS
        }
        _backends.clear_probe_cache()
    from layerzero_serve.selection._selector import BackendState

    return Selector(
        backends={n: BackendState(s.available, s.version, s.reason) for n, s in states.items()},
        timings={},
    )


@pytest.mark.parametrize("fake", ["h100", "a100"])
def test_fake_gpu_plans_like_a_real_one_with_the_same_packages(fake, capsys, monkeypatch):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the fake device sees its real probe")
    real = _real_gpu_selector(monkeypatch)
    assert main(["doctor", "--fake-device", fake, "--json", "--max-num-seqs", "16"]) == 0
    doc = json.loads(capsys.readouterr().out)
    from layerzero_serve.kernels.spec import KernelContext, Op

    with fake_device(FAKE_DEVICES[fake]):
        for plan in doc["plans"]:
            c = dict(plan["context"], op=Op(plan["context"]["op"]))
            want = explain(KernelContext(**c), real)
            assert plan["chosen"] == (want.choice.name if want.choice else None), c
    assert doc["fake_device"] == fake
    decode = [p for p in doc["plans"] if p["context"]["op"] == "attention_decode"]
    if _installed_here("triton"):
        assert {p["chosen"] for p in decode} == {"triton.paged_decode"}
        assert doc["backends"]["triton"]["available"]
        assert "assumed" in doc["backends"]["triton"]["reason"]


def test_fake_h100_explain_picks_triton_decode(capsys):
    if not _installed_here("triton"):
        pytest.skip("triton is not installed")
    assert main(["explain", "--fake-device", "h100", "--json", "--graph"]) == 0
    assert json.loads(capsys.readouterr().out)["chosen"] == "triton.paged_decode"
    assert main(["doctor", "--fake-device", "h100", "--max-num-seqs", "8"]) == 0
    out = capsys.readouterr().out
    assert "[fake: --fake-device h100" in out and "installed packages" in out
    assert "-> torch.paged_decode" not in out and "-> triton.paged_decode" in out


def test_backends_on_fake_devices():
    local = {
        "torch": BackendStatus("torch", True, "2", ""),
        "triton": BackendStatus("triton", False, "3", "installed; no CUDA device (...)"),
        "flashinfer": BackendStatus("flashinfer", False, None, "import failed: No module"),
        "xformers": BackendStatus("xformers", False, "0.1", "its C++/CUDA extension did not load"),
        "liger_kernel": BackendStatus("liger_kernel", True, "1", ""),
    }
    gpu = _device.backends_on(FAKE_DEVICES["h100"], local)
    assert gpu["triton"].available and "assumed" in gpu["triton"].reason
    assert gpu["liger_kernel"].available and gpu["torch"].available
    assert not gpu["flashinfer"].available and not gpu["xformers"].available
    cpu = _device.backends_on(FAKE_DEVICES["cpu"], local)
    assert [n for n, s in cpu.items() if s.available] == ["torch"]
    assert cpu["liger_kernel"].reason == "needs a CUDA device"
