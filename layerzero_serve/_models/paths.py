"""What ``model=`` may name, and one clear error per way a model path can be wrong.

``model`` is a local Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``),
``"default"`` (the embedded model) or ``"dummy:<preset>"``. Nothing is downloaded. Each problem
gets its own message: the path does not exist, it looks like a Hugging Face Hub id, it is a file,
the directory has no ``config.json``, it holds only PyTorch ``.bin``/``.pt`` weights (convert
them to safetensors), it has no weights at all, or an index names an absent shard.
"""

from __future__ import annotations

import re
from pathlib import Path

from layerzero_serve.errors import ModelPathError, UnsupportedModelError

#: ``org/name`` with Hub-legal characters: what a Hugging Face Hub model id looks like.
_HUB_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")

#: Weight files in formats the loader does not read (safetensors only).
_OTHER_WEIGHTS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.gguf")


def convert_hint(src: Path) -> str:
    """How to turn a ``.bin`` checkpoint in ``src`` into a safetensors one next to it."""
    dst = src.with_name(src.name + "-safetensors")
    return (
        'convert it to safetensors first, e.g. python -c "from transformers import '
        f"AutoModelForCausalLM as M; M.from_pretrained('{src}').save_pretrained('{dst}', "
        'safe_serialization=True)" (then copy the tokenizer files), and pass that directory'
    )


def looks_like_hub_id(name: str) -> bool:
    """``"meta-llama/Llama-3.2-1B"``: one slash, Hub-legal characters, not a local path."""
    return bool(_HUB_ID_RE.fullmatch(name)) and not Path(name).expanduser().exists()


def check_model_dir(name: str | Path) -> Path:
    """``name`` as a checkpoint directory that holds ``config.json``, else
    :class:`ModelPathError` saying which problem applies. Host only."""
    text = str(name)
    path = Path(text).expanduser()
    if not path.exists():
        if looks_like_hub_id(text):
            raise ModelPathError(
                text,
                "no such local directory, and it looks like a Hugging Face Hub id: downloading "
                "is not supported. Download it first (e.g. `hf download "
                f"{text} --local-dir ./{text.split('/')[-1]}`) and pass that directory, "
                "or pass 'default' or 'dummy:<preset>' instead",
                path,
                hint=False,
            )
        raise ModelPathError(text, f"no such file or directory: {path}", path)
    if not path.is_dir():
        hint = " (pass the directory that holds it)" if path.name == "config.json" else ""
        raise ModelPathError(text, f"{path} is a file, not a checkpoint directory{hint}", path)
    if not (path / "config.json").is_file():
        raise ModelPathError(
            text, f"the directory {path} has no config.json (not a Hugging Face checkpoint)", path
        )
    return path


def unsupported_weights(path: Path) -> UnsupportedModelError | None:
    """An error for a directory whose only weights are in a format the loader does not read
    (``pytorch_model.bin``, ``*.pt``, ``*.gguf``...), else None."""
    found = sorted({f.name for pattern in _OTHER_WEIGHTS for f in path.glob(pattern)})
    if not found:
        return None
    shown = ", ".join(found[:4]) + (" ..." if len(found) > 4 else "")
    return UnsupportedModelError(
        f"{path}: holds weights only as {shown}; only safetensors checkpoints are supported "
        f"(model.safetensors, or shards listed in model.safetensors.index.json): "
        + convert_hint(path)
    )
