"""``layerzero-serve``: ``demo`` (the README's main job), ``generate``, ``doctor``, ``explain``,
``tune`` (measure the kernels of a model's plans into this device's timing table).

Help text is plain text (what ``--help`` prints), with every option's default shown.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time

from layerzero_serve import _envs as envs
from layerzero_serve.errors import ValidationError

DEMO_SYSTEM_PROMPTS = [
    "You are a helpful assistant. Answer the question in one sentence. ",
    "Once upon a time there was a small robot who wanted to learn how to paint the stars. ",
]
DEMO_QUESTIONS = [
    "What is the capital of France?",
    "Explain how a compiler works.",
    "Write a short poem about the sea.",
    "How does a paged KV cache store keys and values?",
    "Why do CUDA graphs make decoding faster?",
    "What does prefix caching reuse?",
    "Describe continuous batching.",
    "What is speculative decoding?",
]


DESCRIPTION = """\
Run decoder LLMs with a paged KV cache, CUDA-graph decode, speculative decoding and per-plan
kernel selection. Run 'layerzero-serve COMMAND --help' for a command's options.
"""

EPILOG = """\
models (--model):
  default             the embedded model: a small random-weight Llama written on first use
                      (its text is gibberish; it runs anywhere, nothing is downloaded)
  dummy:<preset>      random weights with real shapes: dummy:tiny, dummy:small-d128,
                      dummy:llama3.2-1b (~4.6 GiB in float32 on a CPU, ~2.3 GiB bf16 on a GPU),
                      dummy:llama3-8b (~30 GiB in float32 on a CPU, ~15 GiB bf16 on a GPU)
  /path/to/checkpoint a local Hugging Face checkpoint directory: config.json + *.safetensors
                      (Hub ids are not downloaded; .bin weights must be converted first)

examples:
  layerzero-serve demo
  layerzero-serve generate --prompt "What is the capital of France?" --max-tokens 32
  layerzero-serve doctor --fake-device h100
  layerzero-serve explain --op attention_decode --batch 8 --graph
  layerzero-serve tune --model dummy:tiny --reps 10

environment: LZ_LOG_LEVEL (log level), LZ_CACHE_DIR (where the default model is written),
LZ_KERNEL_POLICY (kernel policy, e.g. lock.attention_decode=triton.paged_decode),
LZ_TIMING_DIR / LZ_TIMING_TABLE (kernel timing tables; LZ_TIMING_TABLE=off ignores them),
LZ_TUNE_AT_STARTUP=1 (the engine measures kernels missing from the table when it starts).
"""

_MODEL_HELP = "a local checkpoint directory, dummy:<preset> or 'default' (see the list below)"


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Descriptions as written; ``(default: X)`` after every option that has a meaningful
    default (not after flags, nor where the default is None)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        default = action.default
        if (
            "%(default)" in help_text
            or default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or not action.option_strings
        ):
            return help_text
        return help_text + " (default: %(default)s)"


def package_version() -> str:
    """The installed distribution's version (``layerzero-serve``), else the package's."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("layerzero-serve")
    except PackageNotFoundError:
        from layerzero_serve import __version__

        return __version__


MAX_DEMO_REPEAT = 10_000  # copies of the 14-prompt demo set (140k requests at most)
_TOKEN_IDS_RE = re.compile(r"\s*[0-9]+\s*(,\s*[0-9]+\s*)*")


def int_in(low: int, high: int):
    """An argparse ``type``: an integer in ``[low, high]``, else a usage error (exit 2) that
    names the option, raised while parsing, before anything is loaded."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(
                f"{text!r} is invalid; allowed: an integer in [{low}, {high}]"
            )
        return value

    parse.__name__ = "int"
    return parse


def _engine_args(p: argparse.ArgumentParser, model_help: str = _MODEL_HELP) -> None:
    p.add_argument("--model", default="default", help=model_help)
    p.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="weights and activations; auto = float32 on a CPU, the checkpoint's dtype (else "
        "bfloat16) on a GPU",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--max-num-seqs", type=int, default=256, help="requests in one batch at most")
    p.add_argument(
        "--max-num-batched-tokens", type=int, default=2048, help="tokens in one step at most"
    )
    p.add_argument(
        "--num-kv-blocks",
        type=int,
        default=None,
        help="KV pool size in blocks (default: sized from the memory available)",
    )
    p.add_argument("--block-size", type=int, default=16, help="tokens per KV block")
    p.add_argument("--no-prefix-caching", action="store_true", help="disable prefix caching")


def _sampling_args(p: argparse.ArgumentParser, max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="0 = off")
    p.add_argument("--seed", type=int, default=None, help="per-request sampling seed")
    p.add_argument("--ignore-eos", action="store_true", help="keep generating past EOS")


def _llm(args: argparse.Namespace):
    from layerzero_serve.llm import LLM

    return LLM(
        args.model,
        dtype=args.dtype,
        device=args.device,
        max_num_seqs=args.max_num_seqs,
        max_num_batched_tokens=args.max_num_batched_tokens,
        num_kv_blocks=args.num_kv_blocks,
        block_size=args.block_size,
        enable_prefix_caching=not args.no_prefix_caching,
    )


def _params(args: argparse.Namespace):
    from layerzero_serve.sampling import SamplingParams

    return SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        min_p=args.min_p,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
    )


def _token_id_prompts(prompts: list[str] | None) -> list[list[int]]:
    """``--prompt`` values as token-id lists (``--token-ids``); checked before the model loads."""
    allowed = "comma-separated non-negative integer token ids with --token-ids, e.g. 1,2,3"
    if not prompts:
        raise ValidationError("--prompt", None, allowed, "--token-ids needs at least one --prompt")
    for p in prompts:
        if not _TOKEN_IDS_RE.fullmatch(p):
            raise ValidationError("--prompt", p, allowed)
    return [[int(t) for t in p.split(",")] for p in prompts]


def cmd_generate(args: argparse.Namespace) -> int:
    # Validate every input before the (possibly slow) model load.
    if args.token_ids:
        prompts = _token_id_prompts(args.prompt)
    else:
        prompts = args.prompt or ["You are a helpful assistant."]
    params = _params(args)
    llm = _llm(args)
    for r in llm.generate(prompts, params, use_tqdm=not args.quiet):
        shown = r.text if r.text is not None else r.token_ids
        print(
            json.dumps(
                {
                    "prompt": r.prompt or r.prompt_token_ids,
                    "output": shown,
                    "finish_reason": r.finish_reason,
                },
                ensure_ascii=False,
            )
        )
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    params = _params(args)  # sampling options are checked before the model loads
    llm = _llm(args)
    # Wave 1 warms the prefix cache with one question per system prompt; wave 2 sends the rest
    # (repeated), which share those prefixes: what a chat service sees.
    warm = [s + DEMO_QUESTIONS[0] for s in DEMO_SYSTEM_PROMPTS]
    rest = [s + q for s in DEMO_SYSTEM_PROMPTS for q in DEMO_QUESTIONS[1:]] * args.repeat
    t0 = time.perf_counter()
    results = llm.generate(warm, params, use_tqdm=not args.quiet)
    results += llm.generate(rest, params, use_tqdm=not args.quiet)
    wall = time.perf_counter() - t0
    st = llm.engine.stats()
    gen = sum(len(r.token_ids) for r in results)
    for r in results[:3]:
        print(f"> {r.prompt!r}\n  {r.text!r} [{r.finish_reason}]")
    dev = llm.engine.resolved
    print(
        f"model: {llm.engine.config.model} ({llm.engine.model_dir or 'dummy weights'}) "
        f"on {dev.device}, {str(dev.dtype).removeprefix('torch.')}"
    )
    print(
        f"requests: {len(results)}, generated tokens: {gen}, wall: {wall:.2f} s, "
        f"throughput: {gen / wall:.1f} tokens/s"
    )
    print(
        f"prefix cache hit rate: {st['prefix_cache_hit_rate']:.1%} "
        f"({st['prefix_cache_hit_tokens']} prompt tokens served from cache)"
    )
    print(f"preemptions: {st['num_preemptions']}, KV pool: {st['kv_blocks']} blocks")
    print("kernels: " + ", ".join(f"{k}={v}" for k, v in st["kernels"].items()))
    t = st["timings_s"]
    print("time split: " + ", ".join(f"{k} {v:.3f}s" for k, v in t.items()))
    return 0


def _tune_plans(args: argparse.Namespace):
    """(device, shape, plans) of a serving run of ``--model``, as the engine would plan it:
    CUDA-graph decode buckets on a GPU (``--buckets`` or the engine's), one eager decode plan
    at ``--max-num-seqs`` on the CPU."""
    import torch

    from layerzero_serve._cli_doctor import _shape
    from layerzero_serve.selection import batch_buckets, model_plans, probe_device

    if not re.fullmatch(r"auto|cpu|cuda(:[0-9]+)?", args.device) or (
        args.device.startswith("cuda") and not torch.cuda.is_available()
    ):
        raise ValidationError("device", args.device, "auto, cpu, cuda or cuda:N (with CUDA)")
    dev = probe_device(None if args.device == "auto" else args.device)
    buckets = None
    if dev.type == "cuda":
        buckets = args.buckets or batch_buckets(min(args.max_num_seqs, 256))
    elif args.buckets:
        raise ValidationError(
            "buckets", args.buckets, "no --buckets on a CPU", "the CPU engine has no graphs"
        )
    shape = _shape(args.model, args.dtype, dev.type)
    return dev, shape, model_plans(dev, shape, args.block_size, args.max_num_seqs, buckets)


def _bucket_list(text: str) -> list[int]:
    """``--buckets 1,2,4,8``: sorted distinct batch sizes >= 1."""
    try:
        out = sorted({int(t) for t in text.split(",")})
    except ValueError:
        out = []
    if not out or out[0] < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is invalid; allowed: e.g. 1,2,4,8 (ints >= 1)")
    return out


def cmd_tune(args: argparse.Namespace) -> int:
    from layerzero_serve._cli_doctor import device_line
    from layerzero_serve.selection import (
        MEASURED_OPS,
        TuneProgress,
        TuneSettings,
        check_table_path,
        tune_device,
    )

    ops = [o.strip() for o in args.ops.split(",")] if args.ops else MEASURED_OPS
    # every option is checked before the model's config is read or anything is built
    settings = TuneSettings(args.reps, args.warmup, args.context_len, force=args.force, ops=ops)
    if args.table_path is not None:
        check_table_path(args.table_path)
    dev, shape, plans = _tune_plans(args)
    print(device_line(dev, None))
    print(
        f"tuning {len(plans)} plans of {args.model} ({shape.dtype}, head_dim {shape.head_dim}, "
        f"heads {shape.num_q_heads}/{shape.num_kv_heads}, block {args.block_size}), "
        f"{settings.reps} reps after {settings.warmup} warm-up calls"
    )
    progress = TuneProgress(args.quiet)
    try:
        device = None if args.device == "auto" else args.device
        report = tune_device(plans, None, args.table_path, settings, device, progress)
    finally:
        progress.close()
    print("\n".join(report.text_lines()))
    return 0


def _add_tune(add) -> None:
    from layerzero_serve.config import MAX_NUM_SEQS
    from layerzero_serve.selection import MEASURED_OPS

    tune = add(
        "tune",
        "measure the kernels of a model's plans into this device's timing table",
        "Time every kernel that can run each plan of a serving run of --model on this device "
        "(synthetic\ninputs, warm-up then --reps calls: median and p95) and write the timing "
        "table the engine reads\nat start-up: where two or more kernels of a plan are measured, "
        "the fastest is chosen.\nMeasured ops: " + ", ".join(o.value for o in MEASURED_OPS) + ".",
    )
    tune.add_argument("--model", default="default", help=_MODEL_HELP + " (config.json only)")
    tune.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto = float32 on a CPU, the checkpoint's dtype (else bfloat16) on a GPU",
    )
    tune.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    tune.add_argument(
        "--max-num-seqs", type=int_in(1, MAX_NUM_SEQS), default=256, help="largest batch"
    )
    tune.add_argument(
        "--buckets",
        type=_bucket_list,
        default=None,
        help="decode batch buckets to measure on a GPU, e.g. 1,2,4,8 (default: the engine's, "
        "1, 2, 4, 8, then every 8 up to --max-num-seqs, at most 256)",
    )
    tune.add_argument("--block-size", type=int_in(1, 256), default=16, help="tokens per KV block")
    tune.add_argument("--reps", type=int, default=20, help="timed calls per kernel (1..10000)")
    tune.add_argument("--warmup", type=int, default=3, help="untimed calls first (0..10000)")
    tune.add_argument(
        "--context-len",
        type=int,
        default=None,
        help="cached tokens per decode row (default: 1024 on a GPU, 256 on a CPU)",
    )
    tune.add_argument(
        "--ops", default=None, help="comma-separated ops to measure (default: all measured ops)"
    )
    tune.add_argument(
        "--table-path",
        default=None,
        help="the table file (default: LZ_TIMING_TABLE, else <LZ_TIMING_DIR>/<device>.json, "
        "LZ_TIMING_DIR defaulting to ~/.cache/layerzero_serve/timings)",
    )
    tune.add_argument(
        "--force", action="store_true", help="re-measure entries already in the table"
    )
    tune.add_argument("--quiet", action="store_true", help="no progress bar")
    tune.set_defaults(func=cmd_tune)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="layerzero-serve",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    ap.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def add(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        return sub.add_parser(
            name,
            help=help_text,
            description=description,
            epilog=EPILOG if name in ("demo", "generate") else None,
            formatter_class=HelpFormatter,
        )

    demo = add(
        "demo",
        "batch with shared prefixes on the default model",
        "Send a batch of prompts that share two system prompts (first one per system prompt, "
        "then the rest, repeated)\nand print sample outputs, throughput, the prefix-cache hit "
        "rate and the kernels chosen.",
    )
    _engine_args(demo)
    _sampling_args(demo, max_tokens=32)
    demo.add_argument(
        "--repeat",
        type=int_in(1, MAX_DEMO_REPEAT),
        default=2,
        help=f"copies of the prompt set in the second wave (1..{MAX_DEMO_REPEAT})",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo, ignore_eos=True)
    gen = add(
        "generate",
        "generate for prompts",
        "Generate for each --prompt and print one JSON line per prompt: "
        '{"prompt", "output", "finish_reason"}.',
    )
    _engine_args(gen)
    _sampling_args(gen, max_tokens=64)
    gen.add_argument(
        "--prompt",
        action="append",
        help="prompt text, repeatable (default: one built-in prompt)",
    )
    gen.add_argument(
        "--token-ids", action="store_true", help="prompts are comma-separated token ids"
    )
    gen.add_argument("--quiet", action="store_true", help="no progress bar")
    gen.set_defaults(func=cmd_generate)
    from layerzero_serve._cli_doctor import add_parsers

    add_parsers(add)
    _add_tune(add)
    return ap


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=envs.log_level(), format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.cmd in ("doctor", "explain") and not args.fake_device:
            _device_timings()  # this machine's measured table: plans show their times
        return args.func(args)
    except ValueError as e:  # validation errors: a clear message, no traceback
        print(f"error: {_one_line(_option_message(e, args))}", file=sys.stderr)
        return 2
    except OSError as e:  # an unreadable file or cache directory: not a usage error
        print(f"error: {_one_line(str(e))}", file=sys.stderr)
        return 1


def _device_timings() -> None:
    """Give the process-wide selector this device's timing table, as the engine does."""
    from layerzero_serve.selection import apply_device_timings, get_selector, probe_device

    apply_device_timings(get_selector(), probe_device())


def _option_message(e: ValueError, args: argparse.Namespace) -> str:
    """The message of ``e``; a ValidationError of a field that is also a CLI option
    (``block_size``) names the option (``--block-size``)."""
    msg = str(e)
    param = getattr(e, "param", None) if isinstance(e, ValidationError) else None
    if param and param.isidentifier() and hasattr(args, param) and msg.startswith(f"{param}="):
        msg = "--" + param.replace("_", "-") + msg[len(param) :]
    return msg


def _one_line(msg: str) -> str:
    return "; ".join(line.strip() for line in msg.splitlines() if line.strip()) or "failed"


if __name__ == "__main__":
    sys.exit(main())
