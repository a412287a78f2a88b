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
from safetensors import SafetensorError, safe_open
from tqdm.auto import tqdm

from layerzero_serve._models.config import load_config, parse_dtype
from layerzero_serve._models.llama import LlamaForCausalLM, set_parameter
from layerzero_serve._models.paths import check_model_dir, unsupported_weights
from layerzero_serve.distributed import shard
from layerzero_serve.errors import MissingWeightError, ModelPathError, UnsupportedModelError

#: Checkpoints larger than this show a progress bar unless ``progress=False``.
PROGRESS_THRESHOLD_BYTES = 1 << 30

#: safetensors dtypes a floating parameter may be stored in (cast to the target dtype on load).
#: Integer/bool tensors would be silently reinterpreted and FP8 ones need scales we ignore.
FLOAT_STORAGE_DTYPES = frozenset({"F16", "BF16", "F32", "F64"})


def checkpoint_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: ``model.safetensors``, or the shards
    named by ``model.safetensors.index.json``, or (fallback) every ``*.safetensors`` file.

    Raises:
        ModelPathError: (a ValueError and a FileNotFoundError) the directory is missing, has no
            weights at all, or its index names a shard that is absent (names the file).
        UnsupportedModelError: the only weights are ``pytorch_model.bin`` / ``*.pt`` /
            ``*.gguf`` (says to convert them to safetensors).
    """
    path = Path(path)
    if not path.is_dir():
        check_model_dir(path)  # raises the error that says what is wrong
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if index.is_file():
        return [path / name for name in _index_shards(index)]
    if single.is_file():
        return [single]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        other = unsupported_weights(path)
        if other is not None:
            raise other
        raise ModelPathError(
            path,
            f"no weights in {path}: expected model.safetensors, model.safetensors.index.json "
            "with its shards, or *.safetensors files",
            path,
            hint=False,
        )
    return files


def _index_shards(index: Path) -> list[str]:
    """Shard file names of ``model.safetensors.index.json`` (validated: a JSON object with a
    ``weight_map`` of tensor name -> shard file name in the same directory)."""
    try:
        raw = json.loads(index.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise UnsupportedModelError(f"{index}: not valid JSON ({e})") from None
    weight_map = raw.get("weight_map") if isinstance(raw, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UnsupportedModelError(
            f"{index}: expected a JSON object with a non-empty 'weight_map' "
            "(tensor name -> shard file)"
        )
    names = set()
    for key, name in weight_map.items():
        if not isinstance(name, str) or not name or Path(name).name != name:
            raise UnsupportedModelError(
                f"{index}: weight_map[{key!r}]={name!r} is not a shard file name"
            )
        names.add(name)
    missing = [n for n in sorted(names) if not (index.parent / n).is_file()]
    if missing:
        raise ModelPathError(
            index.parent,
            f"{index.name} names {len(missing)} shard file(s) absent from {index.parent}: "
            + ", ".join(missing[:8])
            + (" ..." if len(missing) > 8 else ""),
            index.parent / missing[0],
            hint=False,
        )
    return sorted(names)


_TORCH_TO_ST = {
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
}


def _check_storage_dtype(file: Path, key: str, stored: object) -> None:
    if stored not in FLOAT_STORAGE_DTYPES:
        raise UnsupportedModelError(
            f"{file.name}: tensor {key} is stored as {stored}; a floating parameter needs one "
            f"of {sorted(FLOAT_STORAGE_DTYPES)}"
        )


def _corrupt(file: Path, e: Exception) -> UnsupportedModelError:
    return UnsupportedModelError(f"{file}: not a valid safetensors file ({e})")


def _resolve_device(device: torch.device | str) -> torch.device:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _plan_tensors(
    files: list[Path], expected: dict[str, torch.nn.Parameter]
) -> tuple[dict[Path, list[str]], bool]:
    """Which needed tensors to read from which file (each once), checked from the headers
    alone: shape against ``expected``, storage dtype floating. Returns the plan and whether
    the headers carried dtypes (safetensors >= 0.4; else the loader checks loaded tensors)."""
    plan: dict[Path, list[str]] = {}
    seen: set[str] = set()
    dtypes_checked = True
    for file in files:
        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                keys = [k for k in f.keys() if k in expected and k not in seen]  # noqa: SIM118
                for key in keys:
                    info = f.get_slice(key)
                    shape, want = tuple(info.get_shape()), tuple(expected[key].shape)
                    if shape != want:
                        raise UnsupportedModelError(
                            f"{key}: checkpoint shape {shape} != {want} implied by config.json"
                        )
                    get_dtype = getattr(info, "get_dtype", None)
                    if get_dtype is None:
                        dtypes_checked = False
                    else:
                        _check_storage_dtype(file, key, get_dtype())
        except (SafetensorError, OSError) as e:
            raise _corrupt(file, e) from None
        seen.update(keys)
        plan[file] = keys
    return plan, dtypes_checked


def load_model(
    path: str | Path,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str = "cpu",
    *,
    progress: bool | None = None,
    layout=None,
) -> LlamaForCausalLM:
    """Load the checkpoint directory ``path`` (``config.json`` + safetensors).

    Args:
        dtype: parameter dtype; ``None``/``"auto"`` = the config's ``torch_dtype``/``dtype``,
            else float32.
        device: target device; tensors are loaded directly there.
        progress: tqdm bar over tensors; ``None`` = only for checkpoints over ~1 GB.
        layout: a ``distributed.TPLayout``: load only this tensor-parallel rank's share, each
            piece read from its safetensors slice (the full tensor is never materialised).

    Raises:
        ModelPathError: a missing directory, no ``config.json``, no weights, or an index
            naming an absent shard (a ValueError and a FileNotFoundError; names the file).
        MissingWeightError: a tensor the model needs is absent (message names it).
        UnsupportedModelError: unsupported or malformed ``config.json`` (names the field), a
            tensor of the wrong shape or of a non-floating dtype (names it), an unreadable
            safetensors file or index (names the file), ``.bin``-only weights.
    Names and shapes are checked from the safetensors headers before any tensor is loaded.
    Extra tensors (``rotary_emb.inv_freq``, a tied ``lm_head.weight``...) are ignored.
    """
    path = Path(path)
    config = load_config(path)
    dtype = parse_dtype(dtype) or config.torch_dtype or torch.float32
    device = _resolve_device(device)
    files = checkpoint_files(path)

    model = LlamaForCausalLM(config, dtype=dtype, device="meta")
    expected = dict(model.named_parameters())  # full shapes: checked against the headers
    if layout is not None:
        model = LlamaForCausalLM(config, dtype=dtype, device="meta", layout=layout)
    plan, dtypes_checked = _plan_tensors(files, expected)
    found = set().union(*plan.values())
    missing = [name for name in expected if name not in found]
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
            try:
                with safe_open(str(file), framework="pt", device=str(device)) as f:
                    for key in keys:
                        if layout is None:
                            tensor = f.get_tensor(key)
                        else:
                            full_shape = tuple(expected[key].shape)
                            tensor = shard(
                                key, f.get_slice(key), layout, config.head_dim, full_shape
                            ).to(device)
                        if not dtypes_checked:  # an old safetensors without header dtypes
                            _check_storage_dtype(
                                file, key, _TORCH_TO_ST.get(tensor.dtype, tensor.dtype)
                            )
                        set_parameter(model, key, tensor.to(dtype))
                        bar.update()
            except SafetensorError as e:
                raise _corrupt(file, e) from None
    leftover = model.finalize(device)
    if leftover:  # pragma: no cover - guarded by the header check above
        raise MissingWeightError(f"not loaded: {', '.join(leftover)}")
    return model.eval()
