"""Turn ``EngineConfig.model`` into a loaded model: a checkpoint directory, a GGUF file (or a
directory holding exactly one and no ``config.json``), a dummy preset, or the embedded default
model. Nothing is downloaded; a wrong path says what is wrong
(:class:`ModelPathError`), and weights that cannot fit in the device's available memory are
refused before anything is allocated (:class:`InsufficientMemoryError`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from layerzero_serve._models import (
    ModelConfig,
    build_dummy_model,
    checkpoint_files,
    load_config,
    load_model,
)
from layerzero_serve._models.dummy import dummy_config
from layerzero_serve._models.paths import check_model_dir, find_gguf
from layerzero_serve._text_assets import TextAssets, load_text_assets
from layerzero_serve.config import DEFAULT_MODEL, EngineConfig, ResolvedConfig, resolve
from layerzero_serve.errors import InsufficientMemoryError, ModelPathError
from layerzero_serve.selection import available_memory

__all__ = [
    "InsufficientMemoryError",
    "LoadedModel",
    "ModelPathError",
    "check_weights_fit",
    "load_checkpoint_tokenizer",
    "load_model_source",
    "weight_bytes",
]


@dataclass(slots=True)
class LoadedModel:
    model: torch.nn.Module
    config: ModelConfig
    path: Path | None  # checkpoint directory or .gguf file (None for dummy weights)
    resolved: ResolvedConfig
    text: TextAssets | None = None  # tokenizer, chat template, generation defaults (if any)


def load_checkpoint_tokenizer(model_dir: Path | None):
    """The checkpoint's tokenizer (``tokenizer.json``, or a ``.gguf`` file's vocabulary) as a
    ``tokenizers.Tokenizer``, or None when it has none: ``load_text_assets``' tokenizer.

    A file the ``tokenizers`` library cannot parse raises :class:`UnsupportedModelError` naming
    ``tokenizer.json`` (the library's own error is a bare ``Exception``).
    """
    assets = load_text_assets(None if model_dir is None else Path(model_dir))
    return None if assets is None else assets.tokenizer


def weight_bytes(mc: ModelConfig, dtype: torch.dtype) -> int:
    """Bytes of the model's parameters in ``dtype``."""
    return mc.num_parameters() * torch.empty((), dtype=dtype).element_size()


def check_weights_fit(
    name: str, mc: ModelConfig, dtype: torch.dtype, device: torch.device, ranks: int = 1
):
    """Raise :class:`InsufficientMemoryError` when the weights of ``mc`` in ``dtype`` exceed the
    memory available on ``device`` (host RAM for a CPU, free memory for a GPU); a
    tensor-parallel rank (one of ``ranks``) needs about its share. The KV cache and
    activations come on top; they are sized afterwards from what is left. Host only."""
    got = available_memory(device)
    if got is None:
        return
    available, source = got
    needed = weight_bytes(mc, dtype) // ranks
    if needed <= available:
        return
    gib = 1 << 30
    dt = str(dtype).removeprefix("torch.")
    smaller = [m for m in ("dummy:llama3.2-1b", "dummy:tiny", "default") if m != name]
    hints = [f"a smaller model ({', '.join(smaller)})"]
    if dtype == torch.float32:
        hints.append("dtype bfloat16 (half the memory)")
    if device.type == "cpu":
        hints.append("a GPU (device cuda)")
    raise InsufficientMemoryError(
        name,
        needed,
        available,
        f"model={name!r} needs {needed / gib:.1f} GiB for its {mc.num_parameters() / 1e9:.2f}B "
        f"parameters in {dt} on {device}, but only {available / gib:.1f} GiB is available "
        f"({source}); use " + ", or ".join(hints),
    )


def load_model_source(
    cfg: EngineConfig, tp: tuple[int, int] | None = None, device=None
) -> LoadedModel:
    """Load ``cfg.model`` onto the resolved device and dtype.

    Under tensor parallelism ``tp = (rank, world_size)`` selects this rank's share
    (``distributed.TPLayout``, checked against the model: a ``TensorParallelError`` when the
    heads do not split) and ``device`` its device: a checkpoint directory is read slice by
    slice; dummy and GGUF weights are built whole on the device, cut, and the whole model
    dropped.

    Raises:
        ModelPathError: the model path is missing, a Hugging Face Hub id (nothing is
            downloaded), has no ``config.json`` or no weights, or is a directory with several
            GGUF files (says which).
        UnsupportedModelError: unsupported or malformed checkpoint, ``.bin``-only weights; a
            truncated or corrupt GGUF file, an unsupported GGUF architecture or quantization
            type (names the file and the key or tensor).
        InsufficientMemoryError: the weights do not fit in the memory available on the device
            (checked before anything is allocated).
    """
    name = cfg.model
    ranks = 1 if tp is None else tp[1]
    if name.startswith("dummy:"):
        mc = dummy_config(name)
        layout = _layout(mc, tp)
        res = _resolve(cfg, mc, device)
        check_weights_fit(name, mc, res.dtype, res.device, ranks)
        model = build_dummy_model(name, res.dtype, res.device, seed=cfg.seed)
        return LoadedModel(_cut(model, layout), mc, None, res)
    if name == DEFAULT_MODEL:
        from layerzero_serve._default_model import ensure_default_model

        path = ensure_default_model()
    else:
        gguf_file = find_gguf(name)
        if gguf_file is not None:
            return _load_gguf(name, gguf_file, cfg, tp, device)
        path = check_model_dir(name)
    checkpoint_files(path)  # weights problems are reported before anything is resolved
    mc = load_config(path)
    layout = _layout(mc, tp)
    res = _resolve(cfg, mc, device)
    check_weights_fit(name, mc, res.dtype, res.device, ranks)
    model = load_model(path, dtype=res.dtype, device=res.device, layout=layout)
    return LoadedModel(model, mc, path, res, load_text_assets(path))


def _resolve(cfg: EngineConfig, mc: ModelConfig, device) -> ResolvedConfig:
    """``resolve`` for this model, with a tensor-parallel rank's own device when given."""
    res = resolve(cfg, mc.max_position_embeddings, mc.torch_dtype)
    return res if device is None else replace(res, device=device)


def _layout(mc: ModelConfig, tp: tuple[int, int] | None):
    """This rank's ``TPLayout`` (None at one rank), after checking the model splits."""
    if tp is None:
        return None
    from layerzero_serve.distributed import TPLayout, check_tensor_parallel

    check_tensor_parallel(tp[1], mc)
    return TPLayout.of(mc, *tp)


def _cut(model, layout):
    """This rank's share of a model built whole (the whole one is dropped)."""
    if layout is None:
        return model
    from layerzero_serve._models.sharding import shard_model

    return shard_model(model, layout)


def _load_gguf(name: str, file: Path, cfg: EngineConfig, tp=None, device=None) -> LoadedModel:
    """A GGUF file, parsed once for its config, weights and text assets."""
    from layerzero_serve._models.gguf import (
        gguf_model_config,
        gguf_text_assets,
        load_gguf_model,
        open_gguf,
    )

    gf = open_gguf(file)
    mc = gguf_model_config(gf)
    layout = _layout(mc, tp)
    res = _resolve(cfg, mc, device)
    check_weights_fit(name, mc, res.dtype, res.device, 1 if tp is None else tp[1])
    text = gguf_text_assets(gf)  # before the weights: a tokenizer problem fails fast
    model = load_gguf_model(gf, dtype=res.dtype, device=res.device)
    return LoadedModel(_cut(model, layout), mc, file, res, text)


def peek_model_config(cfg: EngineConfig) -> ModelConfig:
    """``cfg.model``'s config without loading weights (tensor-parallel checks before any
    worker starts). Raises what ``load_model_source`` raises for a bad path or config."""
    name = cfg.model
    if name.startswith("dummy:"):
        return dummy_config(name)
    if name == DEFAULT_MODEL:
        from layerzero_serve._default_model import ensure_default_model

        return load_config(ensure_default_model())
    gguf_file = find_gguf(name)
    if gguf_file is not None:
        from layerzero_serve._models.gguf import gguf_model_config

        return gguf_model_config(gguf_file)
    return load_config(check_model_dir(name))
