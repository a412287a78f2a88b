"""Examples run in-process (their ``main()`` returns what they computed) against a temporary
model cache and a fresh process-wide selector."""

from __future__ import annotations

import pytest

from layerzero_serve._default_model import ensure_default_model
from layerzero_serve.selection import configure, set_selector


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory):
    return ensure_default_model(tmp_path_factory.mktemp("lz_cache"))


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, default_model_dir):
    monkeypatch.setenv("LZ_CACHE_DIR", str(default_model_dir.parent))
    set_selector(None)
    configure(reset=True)
    yield
    set_selector(None)
    configure(reset=True)
