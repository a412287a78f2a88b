"""One opened GGUF file: its metadata with typed, validated access, and its tensors.

Parsing is the ``gguf`` package's (``gguf.GGUFReader``, which memory-maps the file); this module
only turns what the reader finds into clear errors. Every problem raises
:class:`UnsupportedModelError` (a ``ValueError``) naming the file and, where one is at fault, the
metadata key or tensor: a truncated or corrupt file, a key of the wrong type, a missing required
key. The reader parses every metadata array (the tokenizer's ~50k tokens and merges) in Python,
about two seconds for a small model, so a caller that needs the config, the weights and the
tokenizer opens the file once with :func:`open_gguf` and passes the :class:`GGUFFile` around.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from layerzero_serve.errors import ModelPathError, UnsupportedModelError

logger = logging.getLogger("layerzero_serve")

__all__ = ["GGUFFile", "open_gguf"]

_MISSING: Any = object()


class GGUFFile:
    """An opened GGUF file (host only; tensors stay memory-mapped until dequantized).

    Attributes:
        path: the file.
        reader: the ``gguf.GGUFReader``.
        architecture: ``general.architecture`` (``"llama"``, ``"qwen2"``...).
        tensors: tensor name -> ``gguf.ReaderTensor`` (``.shape`` in GGUF order, i.e.
            reversed from PyTorch's; ``.tensor_type`` a ``GGMLQuantizationType``).
    """

    def __init__(self, path: Path, reader: Any) -> None:
        self.path = path
        self.reader = reader
        self.tensors = {t.name: t for t in reader.tensors}
        self.architecture = self.string("general.architecture")

    def __repr__(self) -> str:
        return f"GGUFFile({str(self.path)!r}, architecture={self.architecture!r})"

    # ------------------------------------------------------------------ errors

    def error(self, message: str) -> UnsupportedModelError:
        """An :class:`UnsupportedModelError` prefixed with the file's path."""
        return UnsupportedModelError(f"{self.path}: {message}")

    def _invalid(self, key: str, value: object, expected: str) -> UnsupportedModelError:
        shown = repr(value)
        if len(shown) > 80:
            shown = shown[:77] + "..."
        return self.error(f"metadata {key}={shown} is invalid; expected {expected}")

    # ------------------------------------------------------------------ metadata

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        """The Python value of metadata ``key`` (a scalar, a str or a list), else ``default``;
        a missing key without a default raises naming it."""
        field = self.reader.fields.get(key)
        if field is None:
            if default is _MISSING:
                raise self.error(f"required metadata key {key!r} is missing")
            return default
        try:
            return field.contents()
        except Exception as e:  # malformed field parts: report, do not crash
            raise self.error(f"metadata {key} cannot be read ({e})") from None

    def string(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        if not isinstance(value, str):
            raise self._invalid(key, value, "a string")
        return value

    def integer(self, key: str, default: Any = _MISSING, *, minimum: int = 1) -> Any:
        """An integer metadata value >= ``minimum`` (bools are not integers here)."""
        value = self.raw(key, default)
        if value is default:
            return value
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise self._invalid(key, value, f"an integer >= {minimum}")
        if value < minimum:
            raise self._invalid(key, value, f"an integer >= {minimum}")
        return int(value)

    def positive_float(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        ok = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
            value, (bool, np.bool_)
        )
        if not ok or not np.isfinite(value) or value <= 0:
            raise self._invalid(key, value, "a finite number > 0")
        return float(value)

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        if not isinstance(value, (bool, np.bool_)):
            raise self._invalid(key, value, "true or false")
        return bool(value)

    def string_list(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise self._invalid(key, value, "an array of strings")
        return value

    def number_list(self, key: str, default: Any = _MISSING) -> Any:
        value = self.raw(key, default)
        if value is default:
            return value
        if not isinstance(value, list) or not all(
            isinstance(v, (int, float, np.integer, np.floating)) for v in value
        ):
            raise self._invalid(key, value, "an array of numbers")
        return value

    def token_id(self, key: str, vocab_size: int) -> int | None:
        """An optional token-id key; a value outside ``[0, vocab_size)`` is ignored with a
        warning (as llama.cpp does): the model itself is still usable."""
        value = self.integer(key, None, minimum=0)
        if value is not None and value >= vocab_size:
            logger.warning("%s: ignoring %s=%d (vocabulary of %d)", self.path, key, value,
                           vocab_size)  # fmt: skip
            return None
        return value


def open_gguf(path: str | os.PathLike | GGUFFile) -> GGUFFile:
    """Open and parse ``path`` (a ``.gguf`` file); an already opened :class:`GGUFFile` is
    returned as is.

    Raises:
        ModelPathError: ``path`` does not exist or is not a file.
        UnsupportedModelError: the file is not a valid GGUF file (bad magic, truncated,
            corrupt metadata or tensor table), naming the file.
    """
    if isinstance(path, GGUFFile):
        return path
    if not isinstance(path, (str, os.PathLike)):
        raise ModelPathError(path, "a GGUF path must be a str or a path", None)
    file = Path(path).expanduser()
    if not file.is_file():
        problem = "is a directory, not a .gguf file" if file.is_dir() else "no such file"
        raise ModelPathError(str(path), f"{file}: {problem}", file, hint=False)
    import gguf

    try:
        reader = gguf.GGUFReader(file)
    except Exception as e:  # the reader raises ValueError / IndexError / OSError variously
        size = file.stat().st_size
        raise UnsupportedModelError(
            f"{file}: not a valid GGUF file ({size} bytes; truncated or corrupt?): "
            f"{type(e).__name__}: {e}"
        ) from None
    try:
        return GGUFFile(file, reader)
    except UnsupportedModelError:
        raise
    except Exception as e:  # a reader that parsed but yields inconsistent objects
        raise UnsupportedModelError(f"{file}: not a valid GGUF file ({e})") from None
