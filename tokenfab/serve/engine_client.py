"""AsyncEngineClient: the front end's handle on the engine core process.

It tokenizes nothing itself; it owns the OutputProcessor (detokenization, stop strings, n > 1 grouping), routes
the core's step diffs to per-request queues, turns stop-string hits and dropped clients into aborts, and keeps
the core's latest stats for /metrics and admission.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable

import zmq
import zmq.asyncio

from tokenfab.config import EngineConfig
from tokenfab.engine.messages import EngineStats
from tokenfab.engine.output_processor import OutputProcessor
from tokenfab.engine.types import RequestOutput, SamplingParams
from tokenfab.serve.core_process import run_core
from tokenfab.serve.ipc import (Abort, AddRequests, CoreInfo, Failed, Ready, Shutdown, StepResult, encoder,
                                from_core_decoder)
from tokenfab.tokenizer import Tokenizer


class EngineDead(RuntimeError):
    """The engine core process failed; requests cannot be served."""


class AsyncEngineClient:
    def __init__(self, config: EngineConfig, tokenizer: Tokenizer,
                 on_step: Callable[[StepResult, list[RequestOutput]], None] | None = None) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.processor = OutputProcessor(tokenizer)
        self.on_step = on_step
        self.info: CoreInfo | None = None
        self.stats: EngineStats | None = None
        self.dead: str | None = None
        self._queues: dict[str, asyncio.Queue[RequestOutput | Exception]] = {}
        self._ctx = zmq.asyncio.Context()
        base = os.path.join(tempfile.gettempdir(), f"tokenfab-{uuid.uuid4().hex[:12]}")
        self._addrs = (f"ipc://{base}-in", f"ipc://{base}-out")
        self._to_core = self._ctx.socket(zmq.PUSH)
        self._to_core.bind(self._addrs[0])
        self._from_core = self._ctx.socket(zmq.PULL)
        self._from_core.bind(self._addrs[1])
        self._process: multiprocessing.process.BaseProcess | None = None
        self._reader: asyncio.Task | None = None

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self, timeout: float = 600.0) -> CoreInfo:
        """Spawn the core and wait until its model is loaded."""
        ctx = multiprocessing.get_context("spawn")
        self._process = ctx.Process(target=run_core, args=(self.config, *self._addrs), name="tokenfab-engine-core",
                                    daemon=True)
        self._process.start()
        deadline = time.monotonic() + timeout
        while True:
            if await self._from_core.poll(500):
                message = from_core_decoder.decode(await self._from_core.recv())
                if isinstance(message, Failed):
                    raise EngineDead(f"engine core failed to start:\n{message.message}")
                if isinstance(message, Ready):
                    self.info = message.info
                    break
            if not self._process.is_alive():
                raise EngineDead(f"engine core exited with code {self._process.exitcode} while starting")
            if time.monotonic() > deadline:
                raise EngineDead("engine core did not become ready in time")
        self._reader = asyncio.create_task(self._read_outputs(), name="engine-output-reader")
        return self.info

    async def shutdown(self, timeout: float = 10.0) -> None:
        """Abort whatever is left, stop the core and release the sockets."""
        for queue in self._queues.values():
            queue.put_nowait(EngineDead("the server is shutting down"))
        if self._process is not None and self._process.is_alive():
            await self._to_core.send(encoder.encode(Shutdown()))
            await asyncio.to_thread(self._process.join, timeout)
            if self._process.is_alive():
                self._process.kill()
        if self._reader is not None:
            self._reader.cancel()
        self._to_core.close(linger=0)
        self._from_core.close(linger=0)
        self._ctx.term()
        for addr in self._addrs:
            path = addr.removeprefix("ipc://")
            if os.path.exists(path):
                os.unlink(path)

    @property
    def alive(self) -> bool:
        return self.dead is None and self._process is not None and self._process.is_alive()

    @property
    def num_unfinished(self) -> int:
        return len(self._queues)

    # -- requests -----------------------------------------------------------------------------------------------

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                       prompt: str | None = None, priority: int = 0) -> AsyncIterator[RequestOutput]:
        """Yield the request's cumulative output as it grows; the last one is finished. Leaving early (client
        gone, timeout, cancellation) aborts it in the core and frees its KV blocks."""
        if not self.alive:
            raise EngineDead(self.dead or "the engine core is not running")
        queue: asyncio.Queue[RequestOutput | Exception] = asyncio.Queue()
        core_requests = self.processor.add_group(request_id, prompt, prompt_token_ids, params, time.monotonic(),
                                                 priority)
        self._queues[request_id] = queue
        finished = False
        try:
            await self._to_core.send(encoder.encode(AddRequests(core_requests)))
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
        self.processor.abort(request_id)
        if child_ids and self.alive:
            await self._to_core.send(encoder.encode(Abort(child_ids)))

    # -- the core's output stream -------------------------------------------------------------------------------

    async def _read_outputs(self) -> None:
        try:
            while True:
                if not await self._from_core.poll(1000):
                    if not self._process.is_alive():
                        raise EngineDead(f"engine core exited with code {self._process.exitcode}")
                    continue
                message = from_core_decoder.decode(await self._from_core.recv())
                if isinstance(message, Failed):
                    raise EngineDead(f"engine core failed:\n{message.message}")
                if isinstance(message, StepResult):
                    await self._dispatch(message)
        except EngineDead as e:
            self.dead = str(e)
            for queue in self._queues.values():
                queue.put_nowait(e)

    async def _dispatch(self, result: StepResult) -> None:
        self.stats = result.stats
        outputs, stopped = self.processor.process(result.outputs, time.monotonic())
        if stopped:
            await self._to_core.send(encoder.encode(Abort(stopped)))
        for out in outputs:
            queue = self._queues.get(out.request_id)
            if queue is not None:
                queue.put_nowait(out)
        if self.on_step is not None:
            self.on_step(result, outputs)
