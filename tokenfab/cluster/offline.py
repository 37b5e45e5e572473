"""RouterEngine: the offline engine (LLMEngine's interface) over several engine-core processes behind a Router —
what `LLM(model, data_parallel_size=N)` runs, with `expert_parallel=True` the ranks of one expert-parallel group.

The router and its processes live on an event loop of their own thread; `step` waits for the next step results of
any rank and applies them like LLMEngine.step does.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import itertools
import queue
import threading
import time
from collections.abc import Coroutine
from typing import Any

from tokenfab.cluster.pool import RouterOptions, local_router
from tokenfab.config import EngineConfig
from tokenfab.engine.client import EngineDead
from tokenfab.engine.expert_ranks import check_expert_parallel
from tokenfab.engine.ipc import StepResult
from tokenfab.engine.output_processor import OutputProcessor
from tokenfab.engine.stats import EngineStats
from tokenfab.engine.types import RequestOutput, SamplingParams
from tokenfab.models.loading import load_tokenizer, resolve_model


class RouterEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        source = resolve_model(config.model, prefer_gguf=config.quant_plan.uses("gguf"))
        check_expert_parallel(config, source)
        self.tokenizer = load_tokenizer(source)
        self.outputs = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()
        self._results: queue.Queue[StepResult | BaseException] = queue.Queue()
        self._loop = asyncio.new_event_loop()
        threading.Thread(target=self._loop.run_forever, name="router-engine", daemon=True).start()
        self.router = local_router(config, config.data_parallel_size, RouterOptions())
        try:
            self._call(self.router.start())
        except EngineDead as e:
            raise EngineDead(
                f"{e}\n(the ranks are spawned processes: a script that makes this LLM must guard its entry point "
                'with `if __name__ == "__main__":`)'
            ) from e
        self._pumping: asyncio.Task = self._call(self._start_pump())
        self._closed = False
        atexit.register(self.close)

    def _call(self, work: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(work, self._loop).result()

    async def _start_pump(self) -> asyncio.Task:
        return asyncio.create_task(self._pump())

    async def _stop_pump(self) -> None:
        self._pumping.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._pumping

    async def _pump(self) -> None:
        try:
            async for result in self.router.results():
                self._results.put(result)
        except EngineDead as e:
            self._results.put(e)

    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None, priority: int = 0
    ) -> str:
        request_id = request_id or f"req-{next(self._ids)}"
        self._call(self.router.add(self.outputs.add_prompt(request_id, prompt, params, time.monotonic(), priority)))
        return request_id

    def abort_request(self, request_id: str) -> None:
        self._call(self.router.abort(self.outputs.child_ids(request_id)))
        self.outputs.abort(request_id)

    def step(self) -> list[RequestOutput]:
        """The outputs changed by the next step results to arrive (waits for one; takes all that are there)."""
        results = [self._results.get()]
        while not self._results.empty():
            results.append(self._results.get_nowait())
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        core = [o for r in results if isinstance(r, StepResult) for o in r.outputs]
        outputs, stopped = self.outputs.process(core, time.monotonic())
        if stopped:
            self._call(self.router.abort(stopped))
        return outputs

    def stats(self) -> EngineStats:
        """The ranks' latest stats, summed."""
        return self.router.merged_stats()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._call(self.router.shutdown())
        self._call(self._stop_pump())
        self._loop.call_soon_threadsafe(self._loop.stop)
