"""``layerzero-serve doctor`` and ``layerzero-serve explain``: what the machine has and what the
selection engine picks (and why) for a model's plans.

With ``--fake-device NAME`` both plan as that catalogued device would with this machine's
installed packages: a backend installed here but unusable only for lack of a GPU (Triton on a
CPU machine) counts as available on a fake GPU, one that is not installed stays unavailable,
and the local timing table is not applied.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from dataclasses import asdict

from layerzero_serve.kernels.spec import Op

DEFAULT_DOCTOR_MODEL = "dummy:llama3-8b"
# The engine's ranges (EngineConfig.block_size, EngineConfig.max_num_seqs), checked at parse time.
BLOCK_SIZE_MAX = 256
_GiB = 1 << 30


def _device(args: argparse.Namespace):
    from layerzero_serve.selection import FAKE_DEVICES, probe_device

    if args.fake_device:
        return FAKE_DEVICES[args.fake_device]
    return probe_device()


def _selector(args: argparse.Namespace, dev):
    """The process-wide selector, or for a fake device one that decides as that device would."""
    from layerzero_serve.selection import get_selector, selector_for

    return selector_for(dev) if args.fake_device else get_selector()


def _backends(args: argparse.Namespace, dev):
    from layerzero_serve.kernels.registry import probe_all
    from layerzero_serve.selection import backends_on

    return backends_on(dev) if args.fake_device else probe_all()


def _model_config(model: str):
    """The ModelConfig of ``--model``; a missing, unreadable or invalid checkpoint is a
    ValidationError naming ``--model`` (no traceback)."""
    from layerzero_serve._models import ModelPathError, load_config
    from layerzero_serve._models.dummy import dummy_config
    from layerzero_serve.errors import MODEL_ALLOWED, ValidationError

    try:
        if model.startswith("dummy:"):
            return dummy_config(model)
        if model == "default":
            from layerzero_serve._default_model import ensure_default_model

            return load_config(ensure_default_model())
        return load_config(model)
    except ModelPathError:
        raise  # names `model` and says what is wrong; the CLI shows it as --model
    except ValidationError as e:
        if e.param != "model":
            detail = f"invalid config: {e}"
            raise ValidationError("--model", model, MODEL_ALLOWED, detail) from None
        raise ValidationError("--model", model, e.allowed, "unknown preset") from None
    except (OSError, ValueError) as e:  # unreadable dir, bad JSON, unsupported architecture
        detail = f"cannot read its config: {type(e).__name__}: {e}"
        raise ValidationError("--model", model, MODEL_ALLOWED, detail) from None


def _shape(model: str, dtype: str | None, device_type: str, kv_dtype: str = "auto"):
    from layerzero_serve.selection.plans import ModelShape

    mc = _model_config(model)
    if dtype in (None, "auto"):
        dtype = "float32" if device_type == "cpu" else str(mc.torch_dtype or "bfloat16")
    dtype = dtype.removeprefix("torch.")
    return ModelShape(dtype, mc.head_dim, mc.num_heads, mc.num_kv_heads, mc.vocab_size, kv_dtype)


def fp8_kv_line(dev) -> str:
    """What an FP8 KV cache means on ``dev``: the formats, which kernels read them, and
    whether the hardware has FP8 arithmetic (it is storage either way: values are cast)."""
    native = "yes" if dev.type == "cuda" and dev.fp8 else "no"
    return (
        "FP8 KV cache: kv_cache_dtype fp8_e4m3 / fp8_e5m2 supported (stored as FP8, cast to "
        f"the compute dtype by the torch attention kernels); native FP8 arithmetic: {native}"
    )


def _host() -> dict:
    from layerzero_serve.selection import cpu_name, host_memory

    avail, total = host_memory()
    cores = os.cpu_count() or 0
    return {"cpu": cpu_name(), "cores": cores, "memory_available": avail, "memory_total": total}


def device_line(dev, fake: str | None) -> str:
    """One line about the device planned for: a CPU's model, cores and RAM; a GPU's name,
    compute capability, memory and versions; marked when it is a catalogued (fake) device."""
    versions = f"torch {dev.torch}"
    if dev.type == "cpu":
        if fake:
            return f"device: {dev.name} (cpu, fake: --fake-device {fake}), {versions}"
        host = _host()
        mem = (
            f"memory {dev.free_memory / _GiB:.1f}/{dev.total_memory / _GiB:.1f} GiB available"
            if dev.total_memory
            else "memory unknown"
        )
        return (
            f"device: CPU {dev.name} (cpu, {host['cores']} cores), {mem}, {versions}, "
            "no CUDA device"
        )
    line = (
        f"device: {dev.name} ({dev.type}, sm_{dev.sm}, {dev.generation}), "
        f"memory {dev.free_memory / _GiB:.1f}/{dev.total_memory / _GiB:.1f} GiB free, "
        f"{versions}, CUDA {dev.cuda or '-'}, driver {dev.driver or '-'}"
    )
    return line + (f" [fake: --fake-device {fake}, catalogued values]" if fake else "")


def cmd_doctor(args: argparse.Namespace) -> int:
    from layerzero_serve.selection import explain
    from layerzero_serve.selection.plans import batch_buckets, model_plans

    dev = _device(args)
    shape = _shape(args.model, args.dtype, dev.type, args.kv_cache_dtype)
    backends = _backends(args, dev)
    buckets = batch_buckets(args.max_num_seqs) if dev.type == "cuda" else None
    plans = model_plans(dev, shape, args.block_size, args.max_num_seqs, buckets)
    sel = _selector(args, dev)
    reports = [explain(p, sel) for p in plans]
    if args.json:
        print(
            json.dumps(
                {
                    "device": asdict(dev),
                    "fake_device": args.fake_device,
                    "host": _host(),
                    "backends": {k: asdict(v) for k, v in backends.items()},
                    "model": args.model,
                    "shape": asdict(shape),
                    "fp8_kv_cache": fp8_kv_line(dev),
                    "plans": [r.to_dict() for r in reports],
                },
                indent=2,
            )
        )
        return 0
    print(device_line(dev, args.fake_device))
    if args.fake_device:
        print(
            f"  planning as {dev.name} would with this machine's installed packages: backends "
            "installed here but unusable only for lack of a GPU are assumed available, missing "
            "ones stay unavailable; no local timings are applied"
        )
    print(fp8_kv_line(dev))
    print("backends:" if not args.fake_device else f"backends (as on {args.fake_device}):")
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
    ctx = base_context(
        Op(args.op),
        device=dev,
        shape=shape,
        block_size=args.block_size,
        batch_bucket=args.batch,
        q_len=args.q_len,
        graph_mode=args.graph,
    )
    rep = explain(ctx, _selector(args, dev))
    if args.json:
        print(rep.to_json())
    else:
        if args.fake_device:
            print(f"(planning as --fake-device {args.fake_device} with this machine's packages)")
        print(rep.text())
    return 0 if rep.choice is not None else 1


def _add_common(p: argparse.ArgumentParser) -> None:
    from layerzero_serve.selection import FAKE_DEVICES

    p.add_argument(
        "--fake-device",
        choices=sorted(FAKE_DEVICES),
        help="plan as this catalogued device would, with this machine's installed packages "
        "(default: this machine's device)",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")


def add_parsers(add: Callable[[str, str, str], argparse.ArgumentParser]) -> None:
    """Add ``doctor`` and ``explain`` through ``add(name, help, description)``."""
    from layerzero_serve._cli import int_in
    from layerzero_serve.config import DTYPES, INT32_MAX, MAX_NUM_SEQS
    from layerzero_serve.kv_cache import KV_CACHE_DTYPES

    dtypes = ["auto", *DTYPES]
    model_help = "a local checkpoint directory, dummy:<preset> or 'default' (config.json only)"
    dtype_help = "auto = float32 on a CPU, the checkpoint's dtype (else bfloat16) on a GPU"
    doc = add(
        "doctor",
        "device, kernel backends and the plan table of a model",
        "Print this machine's device, each kernel backend (available or why not), and the "
        "kernel\nchosen for every plan of a serving run of --model (reads its config.json "
        "only; loads no weights).",
    )
    doc.add_argument("--model", default=DEFAULT_DOCTOR_MODEL, help=model_help)
    doc.add_argument("--dtype", default="auto", choices=dtypes, help=dtype_help)
    doc.add_argument(
        "--kv-cache-dtype",
        default="auto",
        choices=list(KV_CACHE_DTYPES),
        help="how the KV cache is stored (the attention plans must read it)",
    )
    doc.add_argument(
        "--block-size", type=int_in(1, BLOCK_SIZE_MAX), default=16, help="tokens per KV block"
    )
    doc.add_argument(
        "--max-num-seqs",
        type=int_in(1, MAX_NUM_SEQS),
        default=256,
        help="largest decode batch (GPU: one graph bucket per size up to it)",
    )
    _add_common(doc)
    doc.set_defaults(func=cmd_doctor)
    ex = add(
        "explain",
        "every candidate for one plan, with reasons and scores",
        "Explain one plan: every candidate kernel, with its score or why it was rejected.\n"
        "Exit status 1 when no kernel can run the plan.",
    )
    ex.add_argument(
        "--op", default="attention_decode", choices=[o.value for o in Op], help="the operation"
    )
    ex.add_argument("--model", default=DEFAULT_DOCTOR_MODEL, help=model_help)
    ex.add_argument("--dtype", default="auto", choices=dtypes, help=dtype_help)
    ex.add_argument(
        "--block-size", type=int_in(1, BLOCK_SIZE_MAX), default=16, help="tokens per KV block"
    )
    ex.add_argument("--batch", type=int_in(1, MAX_NUM_SEQS), default=1, help="batch bucket")
    ex.add_argument(
        "--q-len",
        type=int_in(0, INT32_MAX),
        default=1,
        help="tokens per request: 1 decode, k+1 verify, 0 prefill (variable)",
    )
    ex.add_argument("--graph", action="store_true", help="plan for CUDA-graph capture")
    _add_common(ex)
    ex.set_defaults(func=cmd_explain)
