"""Shared fixtures for end-to-end tests."""

from __future__ import annotations

import pytest
import torch

from layerzero_serve._default_model import ensure_default_model


@pytest.fixture(scope="session")
def default_model_dir(tmp_path_factory):
    """The embedded default model, written once per test session into a temporary cache."""
    return ensure_default_model(tmp_path_factory.mktemp("lz_cache"))


@pytest.fixture
def lz_cache(monkeypatch, default_model_dir):
    """Point LZ_CACHE_DIR at the session's cache so 'default' resolves without re-writing."""
    monkeypatch.setenv("LZ_CACHE_DIR", str(default_model_dir.parent))
    return default_model_dir


@pytest.fixture
def one_thread():
    """torch on one intra-op thread (this VM's 2-thread pool is slow for tiny models)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
