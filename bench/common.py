"""Shared helpers for benchmarks: timing with medians of repeats, and result files with the
device and library versions."""

from __future__ import annotations

import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

# Committed results live in bench/results/ and change only when asked for (``--out bench/results``);
# a run without --out writes to bench/out/ (git-ignored), so trying a benchmark never overwrites
# the committed figures.
DEFAULT_OUT_DIR = Path(__file__).parent / "out"


def out_dir_or_default(out_dir: Path | str | None) -> Path:
    """The folder a benchmark writes to: ``out_dir`` when given, else ``bench/out/``."""
    return Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR


def median_time(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeats`` runs after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def environment() -> dict[str, str]:
    import numpy
    import torch

    env = {
        "python": platform.python_version(),
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "device": "cpu",
    }
    if torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = str(torch.version.cuda)
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        pass
    return env


def write_result(name: str, payload: dict, out_dir: Path | None = None) -> Path:
    out_dir = out_dir_or_default(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{name}.json"
    doc = {
        "benchmark": name,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "environment": environment(),
        **payload,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def install_speculation(eng, spec) -> object:
    """Make ``eng`` decode with ``spec`` (a ``SpecCoordinator``, or None for plain decoding)
    and return the coordinator it had. The step loop runs speculation through its hooks object
    (``Engine._speculation``, built at construction), so assigning ``eng.spec`` alone does not
    change what a step does."""
    from layerzero_serve.spec_decode.step_hooks import NoSpeculation, SpeculationHooks

    saved = eng.spec
    eng.spec = spec
    eng._speculation = NoSpeculation() if spec is None else SpeculationHooks(spec)
    return saved
