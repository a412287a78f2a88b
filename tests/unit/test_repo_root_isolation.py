"""The repository root never shadows installed top-level packages named ``kernels`` or
``scheduler`` (transformers imports Hugging Face's ``kernels``).

The probe checks this process; the subprocess tests install stand-in top-level ``kernels`` and
``scheduler`` packages (through ``PYTHONPATH``) and run the probe from the repository root with
the README's test command and with ``python -m pytest``: both must see the stand-ins, and
``layerzero_serve.kernels`` / ``.scheduler`` must still be the project's.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PROBE = "tests/unit/test_repo_root_isolation.py::test_probe_top_level_names"


def _under(path: str | None, folder: Path) -> bool:
    return bool(path) and Path(path).resolve().is_relative_to(folder)


def test_probe_top_level_names():
    assert not any(_under(p or ".", ROOT) and Path(p or ".").resolve() == ROOT for p in sys.path)
    for name in ("kernels", "scheduler"):
        spec = importlib.util.find_spec(name)
        origin = spec.origin if spec else None
        # absent, or an installed package (HF's kernels in CI, a stand-in below), never ours
        assert not _under(origin, ROOT / name), f"{name} resolves to the repository: {origin}"
        print(f"PROBE {name} -> {origin}")
    import layerzero_serve.kernels as ours_k
    import layerzero_serve.scheduler as ours_s

    for mod, sub in ((ours_k, "kernels"), (ours_s, "scheduler")):
        f = Path(mod.__file__).resolve()
        assert f.parent == ROOT / sub or "site-packages" in f.parts, f


def test_installed_hf_kernels_is_importable_from_the_root_session():
    """In CI the test extra brings transformers, which depends on HF's ``kernels``: the name must
    resolve to site-packages, which is what broke every transformers import before."""
    spec = importlib.util.find_spec("kernels")
    if spec is None:
        pytest.skip("no top-level 'kernels' package installed here")
    assert "site-packages" in Path(spec.origin).resolve().parts, spec.origin


def _standins(tmp_path: Path) -> Path:
    site = tmp_path / "standin_site"
    for name in ("kernels", "scheduler"):
        (site / name).mkdir(parents=True)
        (site / name / "__init__.py").write_text(f"STANDIN = {name!r}\n")
    return site


def _pytest_exe() -> str | None:
    exe = Path(sys.executable).with_name("pytest")
    return str(exe) if exe.exists() else shutil.which("pytest")


@pytest.mark.parametrize("launcher", ["pytest", "python -m pytest"])
def test_standin_packages_win_over_the_repository(tmp_path, launcher):
    site = _standins(tmp_path)
    if launcher == "pytest":
        exe = _pytest_exe()
        if exe is None:
            pytest.skip("no pytest entry point next to this interpreter")
        cmd = [exe]
    else:
        cmd = [sys.executable, "-m", "pytest"]
    env = dict(os.environ, PYTHONPATH=str(site))
    run = subprocess.run(
        [*cmd, PROBE, "-q", "-s", "-p", "no:cacheprovider", "-o", "addopts="],
        cwd=ROOT,  # the root as the working directory, as a user runs it
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    for name in ("kernels", "scheduler"):
        assert f"PROBE {name} -> {site / name / '__init__.py'}" in run.stdout, run.stdout[-2000:]
