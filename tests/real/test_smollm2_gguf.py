"""A real trained model end to end: SmolLM2-135M-Instruct loaded from its GGUF file (Q4_1
weights dequantized to float32) against transformers' own GGUF loader as the oracle.

transformers' ``from_pretrained(gguf_file=...)`` needs ``accelerate``; the oracle is built the
way it does it without that: the config and tensors from transformers' GGUF reader
(``load_gguf_checkpoint``, which maps names and undoes llama.cpp's Q/K permutation itself)
assigned to a transformers ``LlamaForCausalLM``.

Frugal by design (the CPU suite's time budget): one engine, one transformers model and one
transformers tokenizer per module, greedy runs of 20 tokens over four prompts.
"""

from __future__ import annotations

import pytest
import torch

from layerzero_serve import SamplingParams
from layerzero_serve.engine import Engine
from layerzero_serve.errors import UnsupportedModelError

transformers = pytest.importorskip("transformers")
jinja2 = pytest.importorskip("jinja2")
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402

from layerzero_serve._models.gguf import gguf_text_assets  # noqa: E402

NEW_TOKENS = 20
#: a divergence is accepted only at a near tie of transformers' own two candidates
TIE_RTOL = 1e-4

CHAT = [{"role": "user", "content": "What is the capital of France?"}]
PLAIN_PROMPTS = [
    "The three primary colors are",
    "def fibonacci(n):\n    ",
    "Water boils at 100 degrees Celsius, which is",
]


@pytest.fixture(scope="module")
def threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def text(smollm2_gguf):
    return gguf_text_assets(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_tok(smollm2_gguf):
    return transformers.AutoTokenizer.from_pretrained(
        str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name
    )


@pytest.fixture(scope="module")
def hf_model(smollm2_gguf, threads):
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    raw = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=False)["config"]
    assert raw["model_type"] == "llama"
    cfg = transformers.LlamaConfig(**{k: v for k, v in raw.items() if k != "model_type"})
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    tensors = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True, model_to_load=model)
    state = {k: v.to(torch.float32) for k, v in tensors["tensors"].items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    model.tie_weights()
    # the rotary embedding's buffers were created on meta: rebuild it on the host
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)
    return model.eval()


@pytest.fixture(scope="module")
def engine(smollm2_gguf, threads):
    return Engine(
        model=str(smollm2_gguf), device="cpu", dtype="float32", num_kv_blocks=64, max_num_seqs=8
    )


def render_chat(template: str, messages, **special) -> str:
    """The chat template rendered the way transformers renders it (sandboxed Jinja2 with
    trim_blocks / lstrip_blocks)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(
        messages=messages, add_generation_prompt=True, **special
    )


def chat_ids(text, messages) -> list[int]:
    rendered = render_chat(text.chat_template, messages, bos_token=text.bos_token)
    return text.tokenizer.encode(rendered, add_special_tokens=False).ids


@pytest.fixture(scope="module")
def prompts(text) -> list[list[int]]:
    ids = [text.tokenizer.encode(p).ids for p in PLAIN_PROMPTS]
    return [chat_ids(text, CHAT), *ids]


@pytest.fixture(scope="module")
def ours(engine, prompts) -> list[list[int]]:
    """Greedy continuations from the engine, all prompts in one batch."""
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    rids = [engine.add_request(p, params) for p in prompts]
    got: dict[str, list[int]] = {r: [] for r in rids}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id].extend(out.new_token_ids)
    return [got[r] for r in rids]


def test_tokenizer_matches_transformers(text, hf_tok):
    samples = [
        "Hello, world! It's 2024-06-01; π≈3.14159 and 1234567 apples.",
        "naïve café — 東京タワー 🤖🚀 Ünïcödé\u00a0nbsp",
        "def f(x):\n\tif x >= 10:\n        return x**2  # square\n\n\n",
        "   leading, trailing   \r\n\r\nwhitespace runs      end ",
        "I'm sure you'll see THEY'RE right; we've done it, I'd say.",
        "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n<|endoftext|>",
        "<repo_name>org/repo<file_sep>src/main.py\nimport os",
    ]
    for s in samples:
        ids = text.tokenizer.encode(s).ids
        assert ids == hf_tok(s, add_special_tokens=False)["input_ids"], s
        assert text.tokenizer.decode(ids, skip_special_tokens=False) == s
    assert text.tokenizer.get_vocab_size() == len(hf_tok)
    assert text.tokenizer.token_to_id("<|im_start|>") == hf_tok.convert_tokens_to_ids(
        "<|im_start|>"
    )


def test_special_tokens_and_generation_defaults(text, hf_tok, engine):
    assert (text.bos_token, text.eos_token, text.pad_token, text.unk_token) == (
        hf_tok.bos_token,
        hf_tok.eos_token,
        hf_tok.pad_token,
        hf_tok.unk_token,
    )
    assert text.add_bos_token is False  # tokenizer.ggml.add_bos_token of this file
    assert text.generation_config["eos_token_id"] == hf_tok.eos_token_id
    assert engine.model_config.eos_token_ids == (hf_tok.eos_token_id,)
    assert set(hf_tok.all_special_ids) <= text.special_token_ids


def test_chat_template_matches_transformers(text, hf_tok):
    conversations = [
        CHAT,
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Name two primes."},
            {"role": "assistant", "content": "2 and 3."},
            {"role": "user", "content": "Two more?"},
        ],
    ]
    for messages in conversations:
        want = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if hasattr(want, "keys"):  # a BatchEncoding in recent transformers
            want = want["input_ids"]
        assert chat_ids(text, messages) == list(want)


def test_greedy_matches_transformers(hf_model, prompts, ours):
    """Every greedy token of the engine is transformers' argmax given the same prefix.

    Checked teacher-forced (one transformers forward over prompt + our tokens per prompt),
    which is what transformers' greedy ``generate`` computes step by step, so equal argmaxes
    at every position mean token-identical greedy output. A position where they differ is
    accepted only at a float32 near tie of transformers' own logits (relative margin <
    ``TIE_RTOL``), and reported."""
    report = []
    for k, (prompt, got) in enumerate(zip(prompts, ours, strict=True)):
        assert len(got) == NEW_TOKENS
        ids = torch.tensor([prompt + got])
        with torch.no_grad():
            logits = hf_model(ids).logits[0, len(prompt) - 1 : -1].float()  # [NEW_TOKENS, V]
        best = logits.argmax(-1).tolist()
        for i, (mine, ref) in enumerate(zip(got, best, strict=True)):
            if mine == ref:
                continue
            margin = (logits[i, ref] - logits[i, mine]).item()
            scale = logits[i].abs().max().item()
            report.append((k, i, ref, mine, margin, margin / scale))
            assert margin <= TIE_RTOL * scale, (
                f"prompt {k}: token {i} is {mine}, transformers' argmax {ref} with a logit "
                f"margin of {margin:.3g} ({margin / scale:.2g} relative): not a tie"
            )
    print("divergences (prompt, step, hf, ours, margin, relative):", report)
    assert len(report) <= 1, report  # ties are rare: more than one means a real difference


def test_answers_a_factual_question(text, ours):
    answer = text.tokenizer.decode(ours[0], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_truncated_file_is_a_clear_error(smollm2_gguf, tmp_path):
    data = smollm2_gguf.read_bytes()
    for n in (100, len(data) - 4096):  # in the header; in the last tensor's data
        bad = tmp_path / f"cut_{n}.gguf"
        bad.write_bytes(data[:n])
        with pytest.raises(UnsupportedModelError, match="not a valid GGUF") as ei:
            Engine(model=str(bad), device="cpu", dtype="float32", num_kv_blocks=8)
        assert str(bad) in str(ei.value)
