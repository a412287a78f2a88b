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


def timing_table() -> str | None:
    """``LZ_TIMING_TABLE``: JSON of measured kernel timings used to score candidates."""
    return os.environ.get("LZ_TIMING_TABLE") or None
