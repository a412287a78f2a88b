"""Every code block of README.md and docs/api.md runs as written.

Each ```python block runs in a fresh interpreter (blocks are independent programs a reader
copies), from a temporary working directory (never the repository root: see tests/conftest.py),
with the default model's cache from this session. Each ```bash block runs its commands one by
one the same way, except the Set-up block, whose two commands CI itself runs (``.ci/run`` reads
them from the README). A block whose first line is ``# needs: gpu`` is skipped without CUDA.
Signature listings and trees are ```text blocks: reference, not programs.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DOCS = ("README.md", "docs/api.md")
FENCE = re.compile(r"^```(python|bash)[^\n]*\n(.*?)^```\s*$", re.S | re.M)


def _blocks() -> list[tuple[str, int, str, str]]:
    out = []
    for doc in DOCS:
        text = (ROOT / doc).read_text()
        for m in FENCE.finditer(text):
            if m.group(1) == "bash" and text[: m.start()].rpartition("\n## ")[2].startswith(
                "Set-up"
            ):
                continue  # the set-up commands: run by CI (.ci/run), not from inside the tests
            line = text.count("\n", 0, m.start()) + 1
            out.append((doc, line, m.group(1), m.group(2)))
    return out


BLOCKS = _blocks()


def test_docs_have_code_blocks():
    assert sum(doc == "README.md" and lang == "python" for doc, _, lang, _ in BLOCKS) >= 4
    assert any(lang == "bash" for _, _, lang, _ in BLOCKS)


@pytest.mark.parametrize(
    ("doc", "line", "lang", "code"), BLOCKS, ids=[f"{d}:{n}" for d, n, _, _ in BLOCKS]
)
def test_code_block_runs(tmp_path, doc, line, lang, code):
    if code.startswith("# needs: gpu") and not torch.cuda.is_available():
        pytest.skip("block needs a CUDA GPU")
    env = dict(os.environ, LZ_LOG_LEVEL="WARNING", TQDM_DISABLE="1")
    # the venv's scripts (layerzero-serve) first, as in an activated environment
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [sys.executable, "-"] if lang == "python" else ["bash", "-euo", "pipefail", "-s"]
    run = subprocess.run(
        cmd,
        input=code,
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, f"{doc}:{line} failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
