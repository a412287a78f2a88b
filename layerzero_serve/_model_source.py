"""Turn ``EngineConfig.model`` into a loaded model: a checkpoint directory, a dummy preset, or
the embedded default model."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from layerzero_serve._models import ModelConfig, build_dummy_model, load_config, load_model
from layerzero_serve._models.dummy import dummy_config
from layerzero_serve.config import DEFAULT_MODEL, EngineConfig, ResolvedConfig, resolve
from layerzero_serve.errors import UnsupportedModelError, ValidationError


@dataclass(slots=True)
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    path: Path | None  # checkpoint directory (None for dummy weights)
    resolved: ResolvedConfig


def load_checkpoint_tokenizer(model_dir: Path | None):
    """The checkpoint's ``tokenizer.json`` as a ``tokenizers.Tokenizer``, or None when absent.

    A file the ``tokenizers`` library cannot parse raises :class:`UnsupportedModelError` naming
    ``tokenizer.json`` (the library's own error is a bare ``Exception``).
    """
    if model_dir is None:
        return None
    file = Path(model_dir) / "tokenizer.json"
    if not file.exists():
        return None
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises bare Exception for malformed files
        raise UnsupportedModelError(f"{file}: not a valid tokenizer.json ({e})") from None


def load_model_source(cfg: EngineConfig) -> LoadedModel:
    """Load ``cfg.model`` onto the resolved device and dtype."""
    name = cfg.model
    if name.startswith("dummy:"):
        mc = dummy_config(name)
        res = resolve(cfg, mc.max_position_embeddings, mc.torch_dtype)
        model = build_dummy_model(name, res.dtype, res.device, seed=cfg.seed)
        return LoadedModel(model, mc, None, res)
    if name == DEFAULT_MODEL:
        from layerzero_serve._default_model import ensure_default_model

        path = ensure_default_model()
    else:
        path = Path(name).expanduser()
        if not (path / "config.json").is_file():
            raise ValidationError(
                "model",
                name,
                "a checkpoint directory with config.json, 'dummy:<preset>' or 'default'",
            )
    mc = load_config(path)
    res = resolve(cfg, mc.max_position_embeddings, mc.torch_dtype)
    model = load_model(path, dtype=res.dtype, device=res.device)
    return LoadedModel(model, mc, path, res)
