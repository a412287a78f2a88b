"""The text API on a real trained chat model (SmolLM2-135M-Instruct, GGUF): ``LLM.chat`` with
the checkpoint's own template answers a factual question greedily, a stop string cuts real
text where a whole-text search finds it, and streamed deltas add up to the final text.

Frugal (the CPU suite's time budget): one ``LLM`` per module, greedy runs of at most 24 tokens.
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from layerzero_serve import LLM, AsyncEngine, SamplingParams

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)


@pytest.fixture(scope="module")
def llm(smollm2_gguf):
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield LLM(str(smollm2_gguf), device="cpu", max_model_len=256, max_num_seqs=4)
    torch.set_num_threads(n)


def test_chat_answers_and_stop_strings_cut_real_text(llm):
    res = llm.chat(QUESTION, GREEDY, use_tqdm=False)[0]
    text = res.outputs[0].text
    assert "Paris" in text
    assert res.prompt_token_ids == llm.tokenizer.apply_chat_template(
        QUESTION, add_generation_prompt=True
    )
    assert text == llm.tokenizer.decode(
        res.token_ids[:-1] if res.finish_reason == "stop" else res.token_ids,
        skip_special_tokens=True,
    )
    stop = "Paris"
    sp = SamplingParams(temperature=0.0, max_tokens=24, stop=[stop])
    cut = llm.chat(QUESTION, sp, use_tqdm=False)[0].outputs[0]
    assert (cut.text, cut.stop_reason, cut.finish_reason) == (text[: text.find(stop)], stop, "stop")
    assert llm.engine.stats()["kv_cache"]["used"] == 0


def test_streamed_deltas_add_up_on_real_text(llm):
    engine = AsyncEngine(llm.engine)
    prompt = llm.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)

    async def main():
        deltas, last = [], None
        async for out in engine.generate(
            {"prompt_token_ids": llm.tokenizer.encode(prompt, add_special_tokens=False)}, GREEDY
        ):
            deltas.append(out.new_text)
            last = out
        return deltas, last

    deltas, last = asyncio.run(main())
    assert "".join(deltas) == last.text and "Paris" in last.text
