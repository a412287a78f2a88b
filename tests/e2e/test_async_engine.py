"""``AsyncEngine`` on the embedded default model: concurrent streams get the same tokens as
``LLM.generate`` (greedy), their text deltas concatenate to the final text, and a stream left
early (``break``, a cancelled consumer task) aborts its request and frees its KV blocks while
the other streams finish."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from layerzero_serve import LLM, AsyncEngine, SamplingParams
from layerzero_serve.errors import ValidationError

GREEDY = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
PROMPTS = ["The quick brown fox", "Paris is the capital", "Once upon a time"]


@pytest.fixture(scope="module")
def llm(default_model_dir):
    return LLM(default_model_dir, device="cpu", max_model_len=64, cpu_threads=1)


async def _collect(engine: AsyncEngine, prompt, params):
    deltas, last = [], None
    async for out in engine.generate(prompt, params):
        deltas.append(out.new_text)
        last = out
    return deltas, last


def test_concurrent_streams_match_generate_and_deltas_add_up(llm):
    expected = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    engine = AsyncEngine(llm.engine)

    async def main():
        return await asyncio.gather(*(_collect(engine, p, GREEDY) for p in PROMPTS))

    for (deltas, last), want in zip(asyncio.run(main()), expected, strict=True):
        assert last.finished and last.result.finished and last.finish_reason == "length"
        assert last.token_ids == want.token_ids and last.text == want.text
        assert "".join(deltas) == last.text == last.result.outputs[0].text
    assert llm.engine.stats()["kv_cache"]["used"] == 0


def test_leaving_a_stream_aborts_it_and_frees_its_blocks(llm):
    engine = AsyncEngine(llm.engine)
    long = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)

    async def broken_off():
        async with contextlib.aclosing(engine.generate(PROMPTS[0], long)) as stream:
            async for out in stream:
                if len(out.token_ids) >= 3:
                    break

    async def consumer(started: asyncio.Event):
        async for _ in engine.generate(PROMPTS[1], long):
            started.set()

    async def main():
        started = asyncio.Event()
        task = asyncio.create_task(consumer(started))
        other = asyncio.create_task(_collect(engine, PROMPTS[2], GREEDY))
        await broken_off()
        await started.wait()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        deltas, last = await other  # the third stream is unaffected
        while llm.engine.has_unfinished():  # the aborts are applied between steps
            await asyncio.sleep(0.01)
        return deltas, last

    deltas, last = asyncio.run(main())
    want = llm.generate(PROMPTS[2], GREEDY, use_tqdm=False)[0]
    assert last.token_ids == want.token_ids and "".join(deltas) == want.text
    assert llm.engine.stats()["kv_cache"]["used"] == 0
    assert not llm.engine.scheduler.requests


def test_bad_input_raises_before_anything_is_queued(llm):
    engine = AsyncEngine(llm.engine)

    async def main():
        with pytest.raises(ValidationError) as ei:
            async for _ in engine.generate({"prompt": 1}, GREEDY):
                pass
        return ei.value.param

    assert asyncio.run(main()) == "prompt.prompt"
    assert not llm.engine.has_unfinished()


def test_a_late_abort_never_hits_a_new_request_with_the_same_id(llm):
    engine = AsyncEngine(llm.engine)
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)

    async def run():
        return [o async for o in engine.generate(PROMPTS[0], sp, request_id="x")]

    async def main():
        first = await run()
        await engine.abort("x")  # finished: a no-op, also for the next request named "x"
        second = await run()
        return first, second

    first, second = asyncio.run(main())
    assert first[-1].finish_reason == second[-1].finish_reason == "length"
    assert second[-1].token_ids == first[-1].token_ids and len(second[-1].token_ids) == 6
