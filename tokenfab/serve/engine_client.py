"""AsyncEngineClient: the front end's request streams over one engine core (an `EngineClient`).

It tokenizes nothing itself; it owns the OutputProcessor (detokenization, stop strings, n > 1 grouping), routes
the core's step diffs to per-request queues, turns stop-string hits and dropped clients into aborts, and keeps
the core's latest stats for /metrics and admission. Where the core runs (a spawned process over ipc or tcp, a
core on another host, a thread here) is the EngineClient's business.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable

from tokenfab.engine.client import EngineClient, EngineDead
from tokenfab.engine.ipc import StepResult
from tokenfab.engine.messages import CoreInfo, EngineStats
from tokenfab.engine.output_processor import OutputProcessor
from tokenfab.engine.types import RequestOutput, SamplingParams
from tokenfab.tokenizer import Tokenizer

__all__ = ["AsyncEngineClient", "EngineDead"]


class AsyncEngineClient:
    def __init__(
        self,
        core: EngineClient,
        tokenizer: Tokenizer,
        on_step: Callable[[StepResult, list[RequestOutput]], None] | None = None,
        on_abort: Callable[[RequestOutput], None] | None = None,
    ) -> None:
        self.core = core
        self.tokenizer = tokenizer
        self.processor = OutputProcessor(tokenizer)
        self.on_step = on_step
        self.on_abort = on_abort
        """Called with the last output (finish reason abort, its cost so far) of a request left unfinished."""
        self._queues: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self._reader: asyncio.Task | None = None
        self._progress = time.monotonic()
        """When the core last sent a step, or was given work while idle."""

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self, timeout: float = 600.0) -> CoreInfo:
        """Start the core and wait until its model is loaded."""
        info = await self.core.start(timeout)
        self._reader = asyncio.create_task(self._read_outputs(), name="engine-output-reader")
        return info

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Abort whatever is left, stop the core and release its channel."""
        for queue in self._queues.values():
            queue.put_nowait(EngineDead("the server is shutting down"))
        await self.core.shutdown(timeout)
        if self._reader is not None:
            self._reader.cancel()

    @property
    def info(self) -> CoreInfo | None:
        return self.core.info

    @property
    def stats(self) -> EngineStats | None:
        return self.core.stats

    @property
    def dead(self) -> str | None:
        return self.core.dead

    @property
    def alive(self) -> bool:
        return self.core.alive

    @property
    def num_unfinished(self) -> int:
        return len(self._queues)

    @property
    def stalled_for(self) -> float:
        """Seconds the core has had work without sending a step (0 when idle): a hung core's tell."""
        return time.monotonic() - self._progress if self._queues else 0.0

    # -- requests -----------------------------------------------------------------------------------------------

    async def generate(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        prompt: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output as it grows; the last one is finished. Leaving early (client
        gone, timeout, cancellation) aborts it in the core and frees its KV blocks."""
        if not self.alive:
            raise EngineDead(self.dead or "the engine core is not running")
        queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        core_requests = self.processor.add_group(
            request_id, prompt, prompt_token_ids, params, time.monotonic(), priority
        )
        if not self._queues:
            self._progress = time.monotonic()
        self._queues[request_id] = queue
        finished = False
        try:
            await self.core.add(core_requests)
            while not finished:
                item = await queue.get()
                while not isinstance(item, Exception) and not item.finished and not queue.empty():
                    item = queue.get_nowait()  # outputs are cumulative: a slow reader only needs the latest
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._queues.pop(request_id, None)
            if not finished:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        child_ids = self.processor.child_ids(request_id)
        last = self.processor.abort(request_id)
        if last is not None and self.on_abort is not None:
            self.on_abort(last)
        if child_ids and self.alive:
            await self.core.abort(child_ids)

    # -- the core's output stream -------------------------------------------------------------------------------

    async def _read_outputs(self) -> None:
        try:
            async for result in self.core.results():
                self._progress = time.monotonic()
                await self._dispatch(result)
        except EngineDead as e:
            for queue in self._queues.values():
                queue.put_nowait(e)

    async def _dispatch(self, result: StepResult) -> None:
        # A sequence a router could not continue after losing its replica fails its whole request (503).
        lost = {
            group: out.lost
            for out in result.outputs
            if out.lost is not None and (group := self.processor.group_of(out.request_id)) is not None
        }
        outputs, stopped = self.processor.process(result.outputs, time.monotonic())
        if stopped:
            await self.core.abort(stopped)
        for request_id, why in lost.items():
            queue = self._queues.get(request_id)
            if queue is not None:
                queue.put_nowait(EngineDead(why))
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None and out.request_id not in lost:
                queue.put_nowait(out)
        if self.on_step is not None:
            self.on_step(result, outputs)
