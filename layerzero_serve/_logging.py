"""The library's logging set-up, applied once when ``layerzero_serve`` is imported.

Library users see the runtime's log lines (kernel choices, bucket list, KV pool size) without
configuring logging themselves: the ``layerzero_serve`` logger gets its level from
``LZ_LOG_LEVEL`` (default INFO) and, unless ``LZ_CONFIGURE_LOGGING=0``, one stderr handler of its
own with propagation to the root logger turned off, so an application that also configures the
root logger does not print every line twice. With ``LZ_CONFIGURE_LOGGING=0`` the logger is left
untouched (no handler, propagates to root, level NOTSET) for applications that route logs
themselves.

CUDA graphs: host only (import time).
"""

from __future__ import annotations

import logging
import sys

from layerzero_serve import _envs

LOGGER_NAME = "layerzero_serve"
_FORMAT = "%(levelname)s %(name)s: %(message)s"
_HANDLER_FLAG = "_lz_handler"


def configure_logging() -> logging.Logger:
    """Apply ``LZ_LOG_LEVEL`` / ``LZ_CONFIGURE_LOGGING`` to the ``layerzero_serve`` logger.

    Idempotent: calling it again (e.g. after changing the variables) re-reads them and keeps at
    most one handler of its own. An unknown level name falls back to INFO with a warning rather
    than failing the import. Returns the logger.
    """
    logger = logging.getLogger(LOGGER_NAME)
    ours = [h for h in logger.handlers if getattr(h, _HANDLER_FLAG, False)]
    if not _envs.configure_logging():
        for h in ours:
            logger.removeHandler(h)
        logger.propagate = True
        return logger
    name = _envs.log_level()
    level = logging.getLevelName(name)
    bad_level = not isinstance(level, int)
    if bad_level:
        level = logging.INFO
    logger.setLevel(level)
    if not ours:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_FORMAT))
        setattr(handler, _HANDLER_FLAG, True)
        logger.addHandler(handler)
    logger.propagate = False
    if bad_level:
        logger.warning(
            "LZ_LOG_LEVEL=%r is not a logging level (DEBUG, INFO, WARNING, ERROR, CRITICAL); "
            "using INFO",
            name,
        )
    return logger
