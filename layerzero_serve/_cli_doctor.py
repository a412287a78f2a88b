"""``layerzero-serve doctor`` and ``layerzero-serve explain``: what the machine has and what the
selection engine picks (and why) for a model's plans."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict

from layerzero_serve.kernels.spec import Op

DEFAULT_DOCTOR_MODEL = "dummy:llama3-8b"
# The engine's ranges (EngineConfig.block_size, EngineConfig.max_num_seqs), checked at parse time.
BLOCK_SIZE_MAX = 256
_MODEL_ALLOWED = "a checkpoint directory with config.json, 'dummy:<preset>' or 'default'"


def _device(args: argparse.Namespace):
    from layerzero_serve.selection._device import FAKE_DEVICES, probe_device

    if args.fake_device:
        return FAKE_DEVICES[args.fake_device]
    return probe_device()


def _model_config(model: str):
    """The ModelConfig of ``--model``; a missing, unreadable or invalid checkpoint is a
    ValidationError naming ``--model`` (no traceback)."""
    from pathlib import Path

    from layerzero_serve._models import load_config
    from layerzero_serve._models.dummy import dummy_config
    from layerzero_serve.errors import ValidationError

    try:
        if model.startswith("dummy:"):
            return dummy_config(model)
        if model == "default":
            from layerzero_serve._default_model import ensure_default_model

            return load_config(ensure_default_model())
        return load_config(Path(model).expanduser())
    except ValidationError as e:
        if e.param != "model":
            detail = f"invalid config: {e}"
            raise ValidationError("--model", model, _MODEL_ALLOWED, detail) from None
        raise ValidationError("--model", model, e.allowed, "unknown preset") from None
    except FileNotFoundError:
        raise ValidationError("--model", model, _MODEL_ALLOWED, "no config.json found") from None
    except (OSError, ValueError) as e:  # unreadable dir, bad JSON, unsupported architecture
        detail = f"cannot read its config: {type(e).__name__}: {e}"
        raise ValidationError("--model", model, _MODEL_ALLOWED, detail) from None


def _shape(model: str, dtype: str | None, device_type: str):
    from layerzero_serve.selection.plans import ModelShape

    mc = _model_config(model)
    if dtype == "auto":
        dtype = None
    if dtype is None:
        dtype = "float32" if device_type == "cpu" else str(mc.torch_dtype or "bfloat16")
    dtype = dtype.removeprefix("torch.")
    return ModelShape(dtype, mc.head_dim, mc.num_heads, mc.num_kv_heads, mc.vocab_size)


def _add_common(p: argparse.ArgumentParser) -> None:
    from layerzero_serve.selection._device import FAKE_DEVICES

    p.add_argument(
        "--fake-device",
        choices=sorted(FAKE_DEVICES),
        help="plan for a catalogued device instead of this machine",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def cmd_doctor(args: argparse.Namespace) -> int:
    from layerzero_serve.kernels._backends import probe_all
    from layerzero_serve.selection import explain, get_selector
    from layerzero_serve.selection.plans import batch_buckets, model_plans

    dev = _device(args)
    backends = probe_all()
    shape = _shape(args.model, args.dtype, dev.type)
    buckets = batch_buckets(args.max_num_seqs) if dev.type == "cuda" else None
    plans = model_plans(dev, shape, args.block_size, args.max_num_seqs, buckets)
    sel = get_selector()
    reports = [explain(p, sel) for p in plans]
    if args.json:
        print(
            json.dumps(
                {
                    "device": asdict(dev),
                    "backends": {k: asdict(v) for k, v in backends.items()},
                    "model": args.model,
                    "shape": asdict(shape),
                    "plans": [r.to_dict() for r in reports],
                },
                indent=2,
            )
        )
        return 0
    print(
        f"device: {dev.name} ({dev.type}, sm_{dev.sm}, {dev.generation}), "
        f"memory {dev.free_memory / 2**30:.1f}/{dev.total_memory / 2**30:.1f} GiB free, "
        f"torch {dev.torch}, CUDA {dev.cuda or '-'}, driver {dev.driver or '-'}"
    )
    print("backends:")
    for name, st in backends.items():
        state = "available" if st.available else "unavailable"
        print(
            f"  {name:13s} {st.version or '-':14s} {state}"
            + (f": {st.reason}" if st.reason else "")
        )
    print(
        f"plans for {args.model} ({shape.dtype}, head_dim {shape.head_dim}, heads "
        f"{shape.num_q_heads}/{shape.num_kv_heads}, block {args.block_size}):"
    )
    for r in reports:
        c = r.ctx
        chosen = r.choice.name if r.choice else f"ERROR {r.error}"
        others = []
        if r.choice:
            for cand in r.choice.candidates:
                if not cand.chosen:
                    why = (
                        f"score {cand.score:g}"
                        if cand.rejection is None
                        else cand.rejection.code.value
                    )
                    others.append(f"{cand.name} ({why})")
        print(
            f"  {c.op.value:18s} batch {c.batch_bucket:4d} q_len {c.q_len} graph "
            f"{'on ' if c.graph_mode else 'off'} -> {chosen}"
            + (f"   [{'; '.join(others)}]" if others else "")
        )
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from layerzero_serve.selection import explain
    from layerzero_serve.selection.plans import base_context

    dev = _device(args)
    shape = _shape(args.model, args.dtype, dev.type)
    ctx = base_context(Op(args.op), dev, shape, args.block_size, args.batch, args.q_len, args.graph)
    rep = explain(ctx)
    print(rep.to_json() if args.json else rep.text())
    return 0 if rep.choice is not None else 1


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from layerzero_serve._cli import int_in
    from layerzero_serve.config import DTYPES, INT32_MAX, MAX_NUM_SEQS

    dtypes = ["auto", *DTYPES]
    doc = sub.add_parser("doctor", help="device, kernel backends and the plan table of a model")
    doc.add_argument(
        "--model",
        default=DEFAULT_DOCTOR_MODEL,
        help="checkpoint dir, dummy:<preset> or 'default' (config only)",
    )
    doc.add_argument("--dtype", default=None, choices=dtypes, help="default: auto")
    doc.add_argument("--block-size", type=int_in(1, BLOCK_SIZE_MAX), default=16)
    doc.add_argument("--max-num-seqs", type=int_in(1, MAX_NUM_SEQS), default=256)
    _add_common(doc)
    doc.set_defaults(func=cmd_doctor)
    ex = sub.add_parser("explain", help="every candidate for one plan, with reasons and scores")
    ex.add_argument("--op", default="attention_decode", choices=[o.value for o in Op])
    ex.add_argument("--model", default=DEFAULT_DOCTOR_MODEL)
    ex.add_argument("--dtype", default=None, choices=dtypes, help="default: auto")
    ex.add_argument("--block-size", type=int_in(1, BLOCK_SIZE_MAX), default=16)
    ex.add_argument("--batch", type=int_in(1, MAX_NUM_SEQS), default=1, help="batch bucket")
    ex.add_argument(
        "--q-len",
        type=int_in(0, INT32_MAX),
        default=1,
        help="tokens per request: 1 decode, k+1 verify, 0 prefill (variable)",
    )
    ex.add_argument("--graph", action="store_true")
    _add_common(ex)
    ex.set_defaults(func=cmd_explain)
