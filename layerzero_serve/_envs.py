"""Every environment variable the runtime reads, in one place (all prefixed ``LZ_``)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``LZ_CACHE_DIR``: where the embedded default model is written (default
    ``~/.cache/layerzero_serve``)."""
    return Path(os.environ.get("LZ_CACHE_DIR", Path.home() / ".cache" / "layerzero_serve"))


def log_level() -> str:
    """``LZ_LOG_LEVEL``: logging level of the ``layerzero_serve`` logger (default INFO)."""
    return os.environ.get("LZ_LOG_LEVEL", "INFO").upper()


def configure_logging() -> bool:
    """``LZ_CONFIGURE_LOGGING``: ``0`` leaves the ``layerzero_serve`` logger to the application
    (no handler of ours, propagation to root); anything else, or unset, gives it a stderr handler
    at ``LZ_LOG_LEVEL``."""
    return os.environ.get("LZ_CONFIGURE_LOGGING", "1").strip().lower() not in ("0", "false", "no")


def kernel_policy() -> str | None:
    """``LZ_KERNEL_POLICY``: kernel selection policy entries (see selection.policy)."""
    return os.environ.get("LZ_KERNEL_POLICY") or None


def kernel_policy_file() -> str | None:
    """``LZ_KERNEL_POLICY_FILE``: a YAML kernel selection policy (see selection.policy)."""
    return os.environ.get("LZ_KERNEL_POLICY_FILE") or None


_OFF = ("0", "off", "none", "false", "no")
_ON = ("1", "on", "true", "yes")


def timing_table() -> str | None:
    """``LZ_TIMING_TABLE``: one JSON timing table file to use (and that ``layerzero-serve tune``
    writes) instead of the per-device file under :func:`timing_dir`; ``off`` (or ``0``/``none``)
    uses no table at all (see selection._timings). None when unset or off."""
    value = os.environ.get("LZ_TIMING_TABLE", "").strip()
    return None if not value or value.lower() in _OFF else value


def timings_disabled() -> bool:
    """``LZ_TIMING_TABLE=off`` (or ``0``/``none``/``false``/``no``): no timing table is read."""
    return os.environ.get("LZ_TIMING_TABLE", "").strip().lower() in _OFF


def timing_dir() -> Path:
    """``LZ_TIMING_DIR``: the folder of per-device timing tables (default
    ``$LZ_CACHE_DIR/timings``, i.e. ``~/.cache/layerzero_serve/timings``)."""
    value = os.environ.get("LZ_TIMING_DIR", "").strip()
    return Path(value) if value else cache_dir() / "timings"


def tune_at_startup() -> bool:
    """``LZ_TUNE_AT_STARTUP``: ``1`` makes the engine time the kernels of its plans that the
    device's timing table lacks, at start-up, and save them (default off: start-up only reads
    the table)."""
    return os.environ.get("LZ_TUNE_AT_STARTUP", "").strip().lower() in _ON
