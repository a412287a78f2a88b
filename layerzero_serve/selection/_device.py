"""Device probe: what the selection engine knows about the machine. Cached; replaceable by a
fake device for tests and for planning on one machine for another."""

from __future__ import annotations

import contextlib
import functools
import platform
from collections.abc import Iterator
from dataclasses import dataclass, replace

import torch


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """Attributes:
    type: "cuda" or "cpu". name: marketing name. sm: major*10+minor (0 on CPU).
    generation: cpu | turing | ampere | ada | hopper | blackwell | unknown.
    bf16 / fp8: native support. total_memory / free_memory: bytes (0 on CPU).
    torch / cuda / driver: versions ("" when not applicable).
    """

    type: str
    name: str
    sm: int = 0
    generation: str = "cpu"
    bf16: bool = True
    fp8: bool = False
    total_memory: int = 0
    free_memory: int = 0
    torch: str = torch.__version__
    cuda: str = ""
    driver: str = ""


def generation_of(sm: int) -> str:
    """GPU generation from the compute capability (major*10+minor)."""
    if sm >= 100:
        return "blackwell"
    if sm >= 90:
        return "hopper"
    if sm == 89:
        return "ada"
    if sm >= 80:
        return "ampere"
    if sm >= 75:
        return "turing"
    return "unknown" if sm else "cpu"


def _driver_version() -> str:
    try:
        import ctypes

        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int()
        lib.cuDriverGetVersion(ctypes.byref(v))
        return f"{v.value // 1000}.{(v.value % 1000) // 10}"
    except OSError:
        return ""


@functools.lru_cache(maxsize=8)
def _probe(index: int | None) -> DeviceInfo:
    if index is None or not torch.cuda.is_available():
        return DeviceInfo(type="cpu", name=platform.processor() or platform.machine())
    props = torch.cuda.get_device_properties(index)
    sm = props.major * 10 + props.minor
    free, total = torch.cuda.mem_get_info(index)
    return DeviceInfo(
        type="cuda",
        name=props.name,
        sm=sm,
        generation=generation_of(sm),
        bf16=sm >= 80,
        fp8=sm >= 89,
        total_memory=total,
        free_memory=free,
        cuda=str(torch.version.cuda or ""),
        driver=_driver_version(),
    )


_override: list[DeviceInfo] = []


def probe_device(device: torch.device | str | None = None) -> DeviceInfo:
    """The device to plan for: a fake one when ``fake_device`` is active, else a cached probe
    of ``device`` (default: the current CUDA device, or the CPU without CUDA)."""
    if _override:
        return _override[-1]
    dev = torch.device(device) if device is not None else None
    if dev is None:
        index = torch.cuda.current_device() if torch.cuda.is_available() else None
    elif dev.type == "cuda":
        index = dev.index if dev.index is not None else torch.cuda.current_device()
    else:
        index = None
    return _probe(index)


@contextlib.contextmanager
def fake_device(info: DeviceInfo) -> Iterator[DeviceInfo]:
    """Plan as if running on ``info`` (tests, or planning for another machine)."""
    _override.append(info)
    try:
        yield info
    finally:
        _override.pop()


_GiB = 1 << 30
FAKE_DEVICES: dict[str, DeviceInfo] = {
    "h100": DeviceInfo(
        "cuda",
        "NVIDIA H100 80GB HBM3",
        90,
        "hopper",
        True,
        True,
        80 * _GiB,
        78 * _GiB,
        cuda="13.0",
        driver="580.0",
    ),
    "a100": DeviceInfo(
        "cuda",
        "NVIDIA A100-SXM4-80GB",
        80,
        "ampere",
        True,
        False,
        80 * _GiB,
        78 * _GiB,
        cuda="12.4",
        driver="550.0",
    ),
    "rtx4090": DeviceInfo(
        "cuda",
        "NVIDIA GeForce RTX 4090",
        89,
        "ada",
        True,
        True,
        24 * _GiB,
        23 * _GiB,
        cuda="12.4",
        driver="550.0",
    ),
    "b200": DeviceInfo(
        "cuda",
        "NVIDIA B200",
        100,
        "blackwell",
        True,
        True,
        180 * _GiB,
        178 * _GiB,
        cuda="13.0",
        driver="580.0",
    ),
    "t4": DeviceInfo(
        "cuda",
        "Tesla T4",
        75,
        "turing",
        False,
        False,
        16 * _GiB,
        15 * _GiB,
        cuda="12.4",
        driver="550.0",
    ),
    "cpu": DeviceInfo("cpu", "x86_64"),
}


def with_memory(info: DeviceInfo, free: int) -> DeviceInfo:
    return replace(info, free_memory=free)
