"""Device probe: what the selection engine knows about the machine. Cached; replaceable by a
fake device for tests and for planning on one machine for another. Also the memory a model may
use here (host RAM from ``/proc/meminfo`` and the cgroup limit, or a GPU's free memory) and
what the installed kernel backends would be on a fake device."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from layerzero_serve.selection._selector import get_selector, peek_selector


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    """Attributes:
    type: "cuda" or "cpu". name: marketing name. sm: major*10+minor (0 on CPU).
    generation: cpu | turing | ampere | ada | hopper | blackwell | unknown.
    bf16 / fp8: native support. total_memory / free_memory: bytes (on a CPU, host RAM:
    ``MemTotal`` / ``MemAvailable``, within a cgroup limit; 0 when unknown).
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
        avail, total = host_memory()
        return DeviceInfo(type="cpu", name=cpu_name(), total_memory=total, free_memory=avail)
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


def probe_device(device: torch.device | str | None = None) -> DeviceInfo:
    """The device to plan for: a fake one when ``fake_device`` is active, else a cached probe
    of ``device`` (default: the current CUDA device, or the CPU without CUDA)."""
    sel = peek_selector()
    if sel is not None and sel.fake_devices:
        return sel.fake_devices[-1]
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
    """Plan as if running on ``info`` (tests, or planning for another machine). The fake
    device is held by the process-wide selector (see :func:`set_selector`)."""
    stack = get_selector().fake_devices
    stack.append(info)
    try:
        yield info
    finally:
        stack.pop()


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


# ------------------------------------------------------------------ host facts


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else ``platform.processor()`` or the machine
    type (``x86_64``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "cpu model") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _meminfo(root: Path) -> tuple[int, int]:
    fields = {}
    for line in (root / "proc/meminfo").read_text().splitlines():
        key, _, rest = line.partition(":")
        parts = rest.split()
        if parts and parts[0].isdigit():
            fields[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    if "MemTotal" not in fields:
        raise OSError("no MemTotal")
    return fields.get("MemAvailable", fields.get("MemFree", 0)), fields["MemTotal"]


def _cgroup_headroom(root: Path) -> tuple[int, int] | None:
    """(bytes still usable, limit) under a cgroup v2/v1 memory limit, None when unlimited.
    Reclaimable page cache (``inactive_file``) counts as usable."""
    for limit_f, usage_f, stat_f in (
        ("sys/fs/cgroup/memory.max", "sys/fs/cgroup/memory.current", "sys/fs/cgroup/memory.stat"),
        (
            "sys/fs/cgroup/memory/memory.limit_in_bytes",
            "sys/fs/cgroup/memory/memory.usage_in_bytes",
            "sys/fs/cgroup/memory/memory.stat",
        ),
    ):
        try:
            limit_text = (root / limit_f).read_text().strip()
            if limit_text == "max" or int(limit_text) >= 1 << 60:  # v1 "unlimited" is ~2^63
                return None
            limit, usage = int(limit_text), int((root / usage_f).read_text().strip())
        except (OSError, ValueError):
            continue
        cache = 0
        with contextlib.suppress(OSError, ValueError):
            for line in (root / stat_f).read_text().splitlines():
                key, _, value = line.partition(" ")
                if key in ("inactive_file", "total_inactive_file"):
                    cache = int(value)
                    break
        return max(0, limit - usage + cache), limit
    return None


def host_memory(root: str | Path = "/") -> tuple[int, int]:
    """(available, total) host RAM in bytes: ``MemAvailable`` / ``MemTotal`` from
    ``/proc/meminfo`` (else ``os.sysconf``), capped by a cgroup memory limit (a container's),
    since exceeding that gets the process killed. ``(0, 0)`` when unknown. ``root`` is for
    tests."""
    root = Path(root)
    try:
        avail, total = _meminfo(root)
    except (OSError, ValueError):
        try:
            page = os.sysconf("SC_PAGE_SIZE")
            total = os.sysconf("SC_PHYS_PAGES") * page
            avail = os.sysconf("SC_AVPHYS_PAGES") * page
        except (AttributeError, OSError, ValueError):
            return 0, 0
    cgroup = _cgroup_headroom(root)
    if cgroup is not None:
        avail, total = min(avail, cgroup[0]), min(total, cgroup[1])
    return avail, total


def available_memory(device: torch.device | str) -> tuple[int, str] | None:
    """Bytes a model may still allocate on ``device`` and where that figure comes from: a GPU's
    free memory (``torch.cuda.mem_get_info``) or the host's ``MemAvailable`` (within a cgroup
    limit). None when it cannot be told."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free, f"free on {device}"
    if device.type != "cpu":
        return None
    avail, _ = host_memory()
    return (avail, "host RAM, MemAvailable") if avail else None


# ------------------------------------------------------------------ fake devices: backends


def backends_on(info: DeviceInfo, local: dict | None = None) -> dict:
    """``name -> BackendStatus`` as they would be on ``info`` with this machine's installed
    packages (``local``: this machine's probe, default ``probe_all()``).

    On a CUDA device a backend that is installed here but unusable only because this machine
    has no CUDA device counts as available (marked "assumed" in its reason); one that failed to
    import, or whose extension did not load, stays unavailable. On a CPU device only ``torch``
    is available. Host only.
    """
    from layerzero_serve.kernels.registry import BackendStatus, probe_all

    local = probe_all() if local is None else local
    out = {}
    for name, st in local.items():
        if info.type == "cpu" and name != "torch":
            reason = st.reason if not st.available else "needs a CUDA device"
            out[name] = BackendStatus(name, False, st.version, reason)
        elif info.type == "cuda" and not st.available and "no CUDA device" in st.reason:
            out[name] = BackendStatus(
                name,
                True,
                st.version,
                f"assumed: installed here, usable on {info.name} (not checked: no GPU here)",
            )
        else:
            out[name] = st
    return out
