"""What ``model=`` may name, and one clear error per way a model path can be wrong.

``model`` is a local Hugging Face checkpoint directory (``config.json`` + ``*.safetensors``), a
llama.cpp ``.gguf`` file (or a directory holding exactly one and no ``config.json``),
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

#: Weight files in formats the checkpoint-directory loader does not read (a ``.gguf`` file is
#: loaded when passed as the model path itself).
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


def find_gguf(name: str | Path) -> Path | None:
    """The GGUF file ``name`` designates, or None when it is not a GGUF source: a path ending
    in ``.gguf`` (which must exist), or a directory without ``config.json`` that holds
    exactly one ``*.gguf`` file. A missing ``.gguf`` path or a directory with several GGUF
    files raises :class:`ModelPathError` saying which. Host only."""
    text = str(name)
    path = Path(text).expanduser()
    if path.suffix.lower() == ".gguf" and not path.is_dir():
        if not path.is_file():
            raise ModelPathError(text, f"no such GGUF file: {path}", path)
        return path
    if not path.is_dir() or (path / "config.json").is_file():
        return None
    found = sorted(f for f in path.glob("*.gguf") if f.is_file())
    if len(found) > 1:
        shown = ", ".join(f.name for f in found[:4]) + (" ..." if len(found) > 4 else "")
        raise ModelPathError(
            text,
            f"the directory {path} holds {len(found)} GGUF files ({shown}); pass the one to "
            "load as a file path",
            path,
            hint=False,
        )
    return found[0] if found else None


def unsupported_weights(path: Path) -> UnsupportedModelError | None:
    """An error for a directory whose only weights are in a format the loader does not read
    (``pytorch_model.bin``, ``*.pt``, ``*.gguf``...), else None."""
    found = sorted({f.name for pattern in _OTHER_WEIGHTS for f in path.glob(pattern)})
    if not found:
        return None
    shown = ", ".join(found[:4]) + (" ..." if len(found) > 4 else "")
    ggufs = [f for f in found if f.endswith(".gguf")]
    gguf_hint = f"; or pass the GGUF file itself as the model ({path / ggufs[0]})" if ggufs else ""
    return UnsupportedModelError(
        f"{path}: holds weights only as {shown}; a checkpoint directory needs safetensors "
        f"(model.safetensors, or shards listed in model.safetensors.index.json): "
        + convert_hint(path)
        + gguf_hint
    )
