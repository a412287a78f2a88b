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


def policy_env() -> str | None:
    """``LZ_KERNEL_POLICY``: kernel selection policy overrides (see selection)."""
    return os.environ.get("LZ_KERNEL_POLICY")
