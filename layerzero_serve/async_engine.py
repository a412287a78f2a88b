"""An asyncio front end for embedding the engine in a server: ``async for out in
engine.generate(prompt, params)`` streams each step's text and tokens.

One background task drives ``Engine.step()``; each step runs in a worker thread (the event loop
stays free for I/O) under a lock, so requests are added and aborted only between steps. A
stream that is left (``break`` out of the ``async for``, the consumer task cancelled, an
exception) aborts its request: the abort is queued and applied before the next step, which
frees the request's KV blocks. ``contextlib.aclosing(engine.generate(...))`` makes that happen
at the ``break`` itself rather than when the generator is collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass

from layerzero_serve.engine import Engine
from layerzero_serve.errors import ValidationError
from layerzero_serve.outputs import Completion, GenerationResult
from layerzero_serve.sampling import SamplingParams
from layerzero_serve.tokenizer import Tokenizer
from layerzero_serve.types import RequestOutput

__all__ = ["AsyncEngine", "StreamOutput"]

logger = logging.getLogger("layerzero_serve")


@dataclass(slots=True)
class StreamOutput:
    """One step of one sample of a streamed request.

    ``new_text`` / ``new_token_ids``: what this step added (``new_text`` None when the request
    is not detokenized); ``text`` / ``token_ids``: the sample's output so far (live objects,
    read only); ``index``: which of the ``n`` samples; ``finished``, ``finish_reason``,
    ``stop_reason``: the sample's end; ``result``: the whole request so far, a
    ``GenerationResult`` as ``LLM.generate`` returns (``result.finished`` once every sample
    has ended).

    CUDA graphs: a host object.
    """

    request_id: str
    index: int
    new_text: str | None
    new_token_ids: list[int]
    text: str | None
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    stop_reason: int | str | None
    result: GenerationResult


class _Stream:
    __slots__ = ("queue", "result", "open")

    def __init__(self, result: GenerationResult) -> None:
        self.queue: asyncio.Queue = asyncio.Queue()
        self.result = result
        self.open = True  # False once the consumer has left


class AsyncEngine:
    """``AsyncEngine(model, **config)`` (an ``Engine`` is built as ``Engine(model, **config)``)
    or ``AsyncEngine(engine)`` over an existing, idle ``Engine`` that nothing else steps.

    ``generate(prompt, sampling_params=None, request_id=None)`` is an async generator of
    :class:`StreamOutput`: one per step in which a sample got tokens or ended. ``prompt`` takes
    the shapes ``Engine.add_request`` takes; ``sampling_params`` None: the model's defaults. A
    bad input raises its ValidationError at the first ``__anext__``, before anything is queued.
    ``abort(request_id)`` ends a request from elsewhere; ``close()`` aborts everything and
    stops the background task. Use from one event loop.

    CUDA graphs: host only; each step runs the engine's graphs in a worker thread.
    """

    def __init__(self, engine: Engine | str | os.PathLike = "default", **config: object) -> None:
        if isinstance(engine, Engine):
            if config:
                raise ValidationError("config", sorted(config), "none with an Engine instance")
            self.engine = engine
        else:
            self.engine = Engine(engine, **config)
        self._owns_engine = not isinstance(engine, Engine)  # close() closes what it built
        self._streams: dict[str, tuple[_Stream, int]] = {}  # sample name -> (stream, index)
        # (request id, the stream it was asked for): applied between steps only while that
        # stream still owns the id, so a late abort never hits a new request reusing the id
        self._aborts: list[tuple[str, _Stream]] = []
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task | None = None

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    def get_tokenizer(self) -> Tokenizer | None:
        return self.engine.tokenizer

    async def generate(
        self,
        prompt: str | Sequence[int] | Mapping[str, object],
        sampling_params: SamplingParams | None = None,
        request_id: str | None = None,
    ) -> AsyncIterator[StreamOutput]:
        stream = await self._add(prompt, sampling_params, request_id)
        rid = stream.result.request_id
        try:
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.result.finished:
                    return
        finally:
            stream.open = False
            if not stream.result.finished:
                self._aborts.append((rid, stream))  # applied between steps (background task)
                self._ensure_running()

    async def abort(self, request_id: str) -> None:
        """Abort a request (a no-op for an unknown or finished one); its stream ends with
        ``finish_reason="abort"``."""
        if not isinstance(request_id, str):
            raise ValidationError("request_id", request_id, "a str")
        entry = self._streams.get(request_id) or self._streams.get(f"{request_id}#0")
        if entry is None:  # unknown or already finished
            return
        self._aborts.append((request_id, entry[0]))
        self._ensure_running()

    async def close(self) -> None:
        """Abort every request and stop the background task (waits for the step in flight)."""
        for stream, _ in list(self._streams.values()):
            self._aborts.append((stream.result.request_id, stream))
        if self._task is not None and not self._task.done():
            await self._task
        if self._owns_engine:  # built here: its tensor-parallel workers end with it
            self.engine.close()

    # ---- the background task -------------------------------------------------------------
    async def _add(self, prompt, sampling_params, request_id) -> _Stream:
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:  # never while a step runs
            eng = self.engine
            text, ids = eng._prompt_ids(prompt)
            rid = eng.add_request(ids, sampling_params, request_id=request_id)
        sp = sampling_params if sampling_params is not None else eng.default_sampling_params
        samples = [Completion(k) for k in range(sp.n)]
        stream = _Stream(GenerationResult(rid, text, ids, samples, time.monotonic()))
        names = [rid] if sp.n == 1 else [f"{rid}#{k}" for k in range(sp.n)]
        for k, name in enumerate(names):
            self._streams[name] = (stream, k)
        self._ensure_running()
        return stream

    def _ensure_running(self) -> None:
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        eng = self.engine
        if self._lock is None:
            self._lock = asyncio.Lock()
        try:
            while True:
                async with self._lock:
                    while self._aborts:
                        rid, stream = self._aborts.pop()
                        if any(s is stream for s, _ in self._streams.values()):
                            eng.abort(rid)
                    if not eng.has_unfinished():
                        return
                    outputs = await asyncio.to_thread(eng.step)
                for o in outputs:
                    self._deliver(o)
                await asyncio.sleep(0)  # let consumers and new requests in between steps
        except BaseException as e:  # the engine failed (or the task was cancelled)
            logger.error("AsyncEngine: the engine's step failed: %s: %s", type(e).__name__, e)
            for stream, _ in set(self._streams.values()):
                stream.queue.put_nowait(e)  # every consumer raises it instead of waiting
                # nobody reads these requests any more: free their KV blocks
                with contextlib.suppress(Exception):  # the engine is already failing
                    eng.abort(stream.result.request_id)
            self._streams.clear()
            if not isinstance(e, Exception):
                raise

    def _deliver(self, o: RequestOutput) -> None:
        entry = self._streams.get(o.request_id)
        if entry is None:
            return
        stream, k = entry
        res = stream.result
        comp = res.outputs[k]
        comp.add(o)
        now = time.monotonic()
        if res.first_token_time is None and o.new_token_ids:
            res.first_token_time = now
        if o.prompt_logprobs is not None and res.prompt_logprobs is None:
            res.prompt_logprobs = o.prompt_logprobs
        if o.finished:
            del self._streams[o.request_id]
            res.finish_time = now
            res.finished = all(c.finished() for c in res.outputs)
        if stream.open:
            stream.queue.put_nowait(
                StreamOutput(
                    res.request_id,
                    k,
                    o.new_text,
                    o.new_token_ids,
                    comp.text,
                    comp.token_ids,
                    o.finished,
                    comp.finish_reason,
                    comp.stop_reason,
                    res,
                )
            )
