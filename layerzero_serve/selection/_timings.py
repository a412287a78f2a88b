"""The persistent timing table: measured median and p95 time per (kernel name, context key) on
one device, stored as JSON with the fingerprint of the device and software it was measured on.

**Where.** One file per device name, ``<dir>/<device-slug>.json``; ``<dir>`` is ``LZ_TIMING_DIR``,
else ``$LZ_CACHE_DIR/timings`` (default ``~/.cache/layerzero_serve/timings``). ``LZ_TIMING_TABLE``
names one file instead (``off`` disables tables); an explicit ``path`` argument wins over both.

**Format** (``"format": "layerzero_serve.timings/1"``)::

    {"format": ..., "updated": "2025-01-01T12:00:00+00:00",
     "fingerprint": {"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda", "sm": 90,
                     "driver": "12.4", "cuda": "12.4", "torch": "2.5.1",
                     "backends": {"flashinfer": "0.2.5", "triton": "3.1.0", ...}},
     "entries": {"<kernel name>": {"<context_key(ctx)>":
                     {"median_s": 1.2e-05, "p95_s": 1.4e-05, "reps": 20}
                   | {"error": "RuntimeError: ..."}}}}

The legacy flat form ``{kernel name: {context key: seconds}}`` is still read (medians only, no
fingerprint, so never invalidated).

**Validity.** A table applies only when its fingerprint equals this machine's: device name and
type, compute capability, driver, CUDA, torch, and the version of every kernel backend the
selector knows (``Selector.backend_state(name).version``, Triton included). Any difference
makes every entry unusable; the reason ("flashinfer 0.2.5 -> 0.2.6") is logged and shown by
``explain``. A corrupt or unreadable file is a logged warning and no table, never an error.

**Writes** are atomic: a temporary file in the same folder, then ``os.replace``.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from layerzero_serve import _envs as envs
from layerzero_serve.errors import ValidationError

if TYPE_CHECKING:
    from layerzero_serve.selection._device import DeviceInfo

logger = logging.getLogger("layerzero_serve")

FORMAT = "layerzero_serve.timings/1"


def _positive(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < math.inf


@dataclass(frozen=True, slots=True)
class Measurement:
    """One kernel timed in one plan: ``median_s`` and ``p95_s`` seconds per call over ``reps``
    repetitions, or ``error`` when its factory or call raised during tuning (then it counts as
    not measured). ``p95_s`` is None for legacy tables, which hold medians only.

    CUDA graphs: a host record.
    """

    median_s: float | None
    p95_s: float | None = None
    reps: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        """A usable time (positive and finite), not a failure."""
        return self.error is None and _positive(self.median_s)

    def to_dict(self) -> dict:
        if self.error is not None:
            return {"error": self.error}
        return {"median_s": self.median_s, "p95_s": self.p95_s, "reps": self.reps}

    @classmethod
    def from_json(cls, value: object) -> Measurement | None:
        """An entry of the file: a number (legacy median) or a dict; None when malformed."""
        if _positive(value):
            return cls(float(value))  # type: ignore[arg-type]
        if not isinstance(value, Mapping):
            return None
        if isinstance(value.get("error"), str):
            return cls(None, None, 0, value["error"])
        med, p95, reps = value.get("median_s"), value.get("p95_s"), value.get("reps", 0)
        if not _positive(med) or (p95 is not None and not _positive(p95)):
            return None
        reps = reps if isinstance(reps, int) and not isinstance(reps, bool) and reps >= 0 else 0
        return cls(float(med), None if p95 is None else float(p95), reps)


@dataclass(frozen=True, slots=True)
class Fingerprint:
    """What a timing depends on besides the kernel and the plan. Two tables with different
    fingerprints do not mix.

    CUDA graphs: a host record.
    """

    device: str
    device_type: str
    sm: int
    driver: str
    cuda: str
    torch: str
    backends: tuple[tuple[str, str | None], ...] = ()  # sorted (backend, version)

    def to_dict(self) -> dict:
        d = {k: getattr(self, k) for k in ("device", "device_type", "sm", "driver", "cuda")}
        return {**d, "torch": self.torch, "backends": dict(self.backends)}

    @classmethod
    def from_json(cls, value: object) -> Fingerprint | None:
        if not isinstance(value, Mapping):
            return None
        try:
            backends = value.get("backends") or {}
            return cls(
                str(value["device"]),
                str(value["device_type"]),
                int(value["sm"]),
                str(value["driver"]),
                str(value["cuda"]),
                str(value["torch"]),
                tuple(sorted((str(k), None if v is None else str(v)) for k, v in backends.items())),
            )
        except (KeyError, TypeError, ValueError, AttributeError):
            return None

    def differences(self, now: Fingerprint) -> list[str]:
        """What changed from this (the table's) to ``now`` (this machine's), one phrase each:
        ``"driver 550.54 -> 555.42"``; empty when they are equal."""
        out = [
            f"{k} {getattr(self, k) or '-'} -> {getattr(now, k) or '-'}"
            for k in ("device", "device_type", "sm", "driver", "cuda", "torch")
            if getattr(self, k) != getattr(now, k)
        ]
        old, new = dict(self.backends), dict(now.backends)
        for name in sorted(old.keys() | new.keys()):
            if old.get(name) != new.get(name):
                out.append(f"{name} {old.get(name) or 'absent'} -> {new.get(name) or 'absent'}")
        return out


def device_fingerprint(device: DeviceInfo, selector) -> Fingerprint:
    """The fingerprint of ``device`` (a ``DeviceInfo``) with the versions of every backend
    ``selector`` has kernels of, plus Triton (the project's own kernels are compiled by it).

    CUDA graphs: host only; may probe (import) the backends once.
    """
    names = {s.backend for s in selector.kernels()} | {"torch", "triton"}
    backends = tuple(sorted((n, selector.backend_state(n).version) for n in names))
    return Fingerprint(
        device.name, device.type, device.sm, device.driver, device.cuda, device.torch, backends
    )


@dataclass(slots=True)
class TimingTable:
    """Measured timings of one device: ``entries[kernel name][context key] -> Measurement``.
    ``fingerprint`` None marks a legacy table (not checked). ``source``: the file it came from.

    CUDA graphs: host only; read when plans are selected, never per step.
    """

    fingerprint: Fingerprint | None = None
    entries: dict[str, dict[str, Measurement]] = field(default_factory=dict)
    source: str = ""

    def get(self, kernel: str, key: str) -> Measurement | None:
        return self.entries.get(kernel, {}).get(key)

    def put(self, kernel: str, key: str, measurement: Measurement) -> None:
        if not isinstance(measurement, Measurement):
            raise ValidationError("measurement", measurement, "a Measurement")
        self.entries.setdefault(kernel, {})[key] = measurement

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())

    def to_dict(self) -> dict:
        return {
            "format": FORMAT,
            "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "fingerprint": None if self.fingerprint is None else self.fingerprint.to_dict(),
            "entries": {
                k: {key: m.to_dict() for key, m in sorted(v.items())}
                for k, v in sorted(self.entries.items())
            },
        }

    @classmethod
    def from_json(cls, doc: object, source: str = "") -> TimingTable:
        """A table from a parsed file (this module's format or the legacy flat mapping);
        malformed entries are skipped. Raises ValueError when ``doc`` is neither."""
        if not isinstance(doc, Mapping):
            raise ValueError("not a JSON object")
        if "format" not in doc:  # legacy {kernel: {key: seconds}}
            fp, raw = None, doc
        elif doc["format"] != FORMAT:
            raise ValueError(f"format {doc['format']!r}, expected {FORMAT!r}")
        else:
            fp, raw = Fingerprint.from_json(doc.get("fingerprint")), doc.get("entries")
            if fp is None or not isinstance(raw, Mapping):
                raise ValueError("missing or malformed fingerprint/entries")
        table = cls(fp, {}, source)
        for kernel, per_key in raw.items():
            if not isinstance(per_key, Mapping):
                continue
            for key, value in per_key.items():
                m = Measurement.from_json(value)
                if m is not None:
                    table.put(str(kernel), str(key), m)
        return table

    def save(self, path: str | os.PathLike) -> Path:
        """Write atomically (temporary file in the same folder, then ``os.replace``): a reader
        never sees half a file, and a crash leaves the old table. Returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        self.source = str(path)
        return path


def read_table(path: str | os.PathLike) -> TimingTable | None:
    """The table in ``path``; None (and a logged warning) when it is missing, unreadable or
    corrupt. Never raises for a bad file."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
        return TimingTable.from_json(doc, str(path))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, ValueError) as e:  # JSONDecodeError is a ValueError
        logger.warning("timing table %s is unreadable, ignored: %s: %s", path, type(e).__name__, e)
        return None


def device_slug(device: DeviceInfo) -> str:
    """A file-name-safe name of the device: ``cuda-nvidia-h100-80gb-hbm3``."""
    slug = re.sub(r"[^a-z0-9]+", "-", f"{device.type} {device.name}".lower()).strip("-")
    return slug[:120] or "device"


def table_path(device: DeviceInfo, path: str | os.PathLike | None = None) -> Path | None:
    """Where the table of ``device`` lives: ``path`` if given, else ``LZ_TIMING_TABLE``, else
    ``<LZ_TIMING_DIR>/<device slug>.json``. None when ``LZ_TIMING_TABLE=off``."""
    if path is not None:
        if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
            raise ValidationError("table_path", path, "None or a file path (str or os.PathLike)")
        return Path(path)
    if envs.timings_disabled():
        return None
    env = envs.timing_table()
    return Path(env) if env else envs.timing_dir() / f"{device_slug(device)}.json"


def load_for(path: str | os.PathLike, expected: Fingerprint) -> tuple[TimingTable | None, str]:
    """``(table, note)``: the table in ``path`` when its fingerprint equals ``expected`` (or it
    is a legacy table), else None; ``note`` says which file applies or why none does."""
    table = read_table(path)
    if table is None:
        return None, f"no usable timing table at {path}"
    if table.fingerprint is None:
        return table, f"{path} (legacy table: no fingerprint, not checked)"
    diff = table.fingerprint.differences(expected)
    if diff:
        note = f"timing table {path} ignored: measured with " + ", ".join(diff)
        logger.warning("%s; re-run `layerzero-serve tune`", note)
        return None, note
    return table, f"{path} ({len(table)} entries, fingerprint matches)"


def apply_device_timings(
    selector, device: DeviceInfo, path: str | os.PathLike | None = None
) -> str:
    """Give ``selector`` the timing table of ``device`` (see :func:`table_path`) if one exists
    and its fingerprint matches; a selector that already holds timings (given at construction
    or through ``LZ_TIMING_TABLE``) keeps them. Returns the note that ``explain`` shows. No
    measurement happens here.

    CUDA graphs: host only; call before plans are selected (it drops cached decisions).
    """
    if selector.timings is not None and path is None:
        return selector.timing_source
    where = table_path(device, path)
    if where is None:
        return "timing tables disabled (LZ_TIMING_TABLE=off)"
    table, note = load_for(where, device_fingerprint(device, selector))
    if table is not None:
        logger.info("kernel timings: %s", note)
    selector.use_timings(table, note)
    return note


def apply_env_table(selector, path: str) -> None:
    """``LZ_TIMING_TABLE`` at a selector's construction: a legacy table applies as it is; one
    with a fingerprint only if it matches this machine's default device. A bad file is a
    logged warning, not an error."""
    table = read_table(path)
    if table is None:
        selector.use_timings(None, f"LZ_TIMING_TABLE={path}: missing or unreadable, ignored")
    elif table.fingerprint is None:
        selector.use_timings(table, f"{path} (LZ_TIMING_TABLE, legacy: no fingerprint check)")
    else:
        from layerzero_serve.selection._device import probe_device

        apply_device_timings(selector, probe_device(), path)
