"""LZ_LOG_LEVEL applies to library users (not only the CLI), as the README documents."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

CODE = (
    "import logging, layerzero_serve\n"
    "log = logging.getLogger('layerzero_serve')\n"
    "log.info('info-line'); log.warning('warning-line')\n"
    "logging.basicConfig(level=logging.INFO)\n"  # an application configuring root as well
    "log.warning('after-root')\n"
)


def _stderr(tmp_path, **env: str) -> str:
    full = {k: v for k, v in os.environ.items() if not k.startswith("LZ_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-c", CODE],
        cwd=tmp_path,  # never the repository root (it would shadow PyPI's `kernels`)
        env=full,
        capture_output=True,
        text=True,
        check=True,
    ).stderr


def test_default_level_is_info_with_one_handler(tmp_path):
    err = _stderr(tmp_path)
    assert "INFO layerzero_serve: info-line" in err
    assert "WARNING layerzero_serve: warning-line" in err
    assert err.count("after-root") == 1  # our handler, no duplicate through root


@pytest.mark.parametrize("level", ["warning", "WARNING"])
def test_level_from_env(tmp_path, level):
    err = _stderr(tmp_path, LZ_LOG_LEVEL=level)
    assert "info-line" not in err
    assert "WARNING layerzero_serve: warning-line" in err


def test_bad_level_warns_and_uses_info(tmp_path):
    err = _stderr(tmp_path, LZ_LOG_LEVEL="loud")
    assert "LZ_LOG_LEVEL='LOUD' is not a logging level" in err
    assert "info-line" in err


def test_configure_logging_off_leaves_logger_to_the_application(tmp_path):
    err = _stderr(tmp_path, LZ_CONFIGURE_LOGGING="0")
    # no handler of ours: before basicConfig only Python's last-resort handler prints warnings
    assert "info-line" not in err
    assert "WARNING:layerzero_serve:after-root" in err  # routed through the root logger
