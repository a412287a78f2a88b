"""Load a Hugging Face safetensors checkpoint into :class:`LlamaForCausalLM`.

The module is built on the ``meta`` device (nothing allocated), every tensor is read by
``safetensors.safe_open(..., device=target)`` straight onto the target device, cast to the target
dtype there and assigned in place of the meta parameter, so the model is never copied through
host memory when loading to a GPU. Peak extra memory is one tensor.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from layerzero_serve._models.config import load_config, parse_dtype
from layerzero_serve._models.llama import LlamaForCausalLM, set_parameter
from layerzero_serve.errors import MissingWeightError, UnsupportedModelError

#: Checkpoints larger than this show a progress bar unless ``progress=False``.
PROGRESS_THRESHOLD_BYTES = 1 << 30


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: ``model.safetensors``, or the shards
    named by ``model.safetensors.index.json``, or (fallback) every ``*.safetensors`` file."""
    path = Path(path)
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [path / name for name in sorted(set(weight_map.values()))]
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no safetensors checkpoint in {path} (.bin is not supported)")
    return files


def _resolve_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def load_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    *,
    progress: bool | None = None,
) -> LlamaForCausalLM:
    """Load the checkpoint directory ``path`` (``config.json`` + safetensors).

    Args:
        dtype: parameter dtype; ``None``/``"auto"`` = the config's ``torch_dtype``/``dtype``,
            else float32.
        device: target device; tensors are loaded directly there.
        progress: tqdm bar over tensors; ``None`` = only for checkpoints over ~1 GB.

    Raises:
        MissingWeightError: a tensor the model needs is absent (message names it).
        UnsupportedModelError: unsupported architecture/config, or a tensor of the wrong shape.
    Names and shapes are checked from the safetensors headers before any tensor is loaded.
    Extra tensors (``rotary_emb.inv_freq``, a tied ``lm_head.weight``...) are ignored.
    """
    path = Path(path)
    config = load_config(path)
    dtype = parse_dtype(dtype) or config.torch_dtype or torch.float32
    device = _resolve_device(device)
    files = checkpoint_files(path)

    model = LlamaForCausalLM(config, dtype=dtype, device="meta")
    expected = dict(model.named_parameters())
    plan: dict[Path, list[str]] = {}
    seen: set[str] = set()
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            keys = [k for k in f.keys() if k in expected and k not in seen]  # noqa: SIM118
            for key in keys:
                shape, want = tuple(f.get_slice(key).get_shape()), tuple(expected[key].shape)
                if shape != want:
                    raise UnsupportedModelError(
                        f"{key}: checkpoint shape {shape} != {want} implied by config.json"
                    )
        seen.update(keys)
        plan[file] = keys
    missing = [name for name in expected if name not in seen]
    if missing:
        raise MissingWeightError(
            f"checkpoint {path} lacks {len(missing)} tensor(s) the model needs: "
            + ", ".join(missing[:8])
            + (" ..." if len(missing) > 8 else "")
        )

    size = sum(f.stat().st_size for f in files)
    show = progress if progress is not None else size > PROGRESS_THRESHOLD_BYTES
    with tqdm(
        total=len(expected), desc=f"loading {path.name}", unit="tensor", disable=not show
    ) as bar:
        for file, keys in plan.items():
            if not keys:
                continue
            with safe_open(str(file), framework="pt", device=str(device)) as f:
                for key in keys:
                    set_parameter(model, key, f.get_tensor(key).to(dtype))
                    bar.update()
    leftover = model.finalize(device)
    if leftover:  # pragma: no cover - guarded by the header check above
        raise MissingWeightError(f"not loaded: {', '.join(leftover)}")
    return model.eval()
