"""`layerzero-serve doctor` and `explain` (CPU, fake devices): what they print is what the
selection engine decides."""

from __future__ import annotations

import json

import pytest

from layerzero_serve._cli import main
from layerzero_serve.selection import configure, reload_policy, set_selector


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.delenv("LZ_KERNEL_POLICY", raising=False)
    set_selector(None)
    configure(reset=True)
    reload_policy()
    yield
    set_selector(None)
    configure(reset=True)


def test_doctor_text_lists_device_backends_and_plans(capsys):
    assert main(["doctor", "--fake-device", "cpu", "--model", "dummy:tiny"]) == 0
    out = capsys.readouterr().out
    assert "device: x86_64 (cpu" in out
    for backend in ("torch", "triton", "flashinfer", "flash_attn", "xformers", "liger_kernel"):
        assert f"\n  {backend}" in out
    assert "attention_decode" in out and "-> torch.paged_decode" in out
    assert "attention_prefill" in out and "-> torch.paged_prefill" in out


def test_doctor_json_matches_the_selector(capsys):
    assert main(["doctor", "--fake-device", "h100", "--json", "--max-num-seqs", "16"]) == 0
    doc = json.loads(capsys.readouterr().out)
    decode = [p for p in doc["plans"] if p["context"]["op"] == "attention_decode"]
    assert [p["context"]["batch_bucket"] for p in decode] == [1, 2, 4, 8, 16]
    for plan in doc["plans"]:
        chosen = [c for c in plan["candidates"] if c["chosen"]]
        assert plan["error"] or (len(chosen) == 1 and chosen[0]["kernel"] == plan["chosen"])
        for c in plan["candidates"]:
            assert c["chosen"] or c["reason_code"] or c["score"] is not None


def test_explain_one_plan_and_policy(capsys, monkeypatch):
    assert (
        main(
            [
                "explain",
                "--fake-device",
                "cpu",
                "--op",
                "attention_decode",
                "--json",
                "--model",
                "dummy:tiny",
            ]
        )
        == 0
    )
    rep = json.loads(capsys.readouterr().out)
    assert rep["chosen"] == "torch.paged_decode"
    reasons = {c["kernel"]: c["reason_code"] for c in rep["candidates"]}
    assert reasons["flashinfer.decode"] in ("device_type", "backend_unavailable")
    monkeypatch.setenv("LZ_KERNEL_POLICY", "lock.attention_decode=flashinfer.decode")
    reload_policy()
    assert main(["explain", "--fake-device", "cpu", "--model", "dummy:tiny"]) == 1
    assert "ERROR" in capsys.readouterr().out
    monkeypatch.delenv("LZ_KERNEL_POLICY")
    reload_policy()  # the environment policy is cached: do not leak the lock to later tests
