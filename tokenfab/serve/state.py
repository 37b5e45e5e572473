"""ServerState: what the routes share — settings, tokenizer, engine client, admission, metrics — built once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TypeVar

from tokenfab.cluster.router import Router
from tokenfab.engine.messages import CoreInfo
from tokenfab.serve.admission import Admission
from tokenfab.serve.engine_client import AsyncEngineClient
from tokenfab.serve.generation import Generation, Job
from tokenfab.serve.metrics import ServerMetrics
from tokenfab.serve.request_log import RequestLog
from tokenfab.serve.settings import ServerSettings
from tokenfab.serve.tools import Template, template_tools
from tokenfab.tokenizer import Tokenizer

logger = logging.getLogger("tokenfab.serve")
T = TypeVar("T")


@dataclass(slots=True)
class ServerState:
    settings: ServerSettings
    tokenizer: Tokenizer
    client: AsyncEngineClient
    metrics: ServerMetrics
    admission: Admission | None = None
    _generation: Generation | None = None
    started: float = 0.0
    """Unix time the engine became ready."""
    _workers: ThreadPoolExecutor | None = None

    @property
    def info(self) -> CoreInfo:
        assert self.client.info is not None, "the engine has not started"
        return self.client.info

    @property
    def generation(self) -> Generation:
        assert self._generation is not None, "the engine has not started"
        return self._generation

    @property
    def router(self) -> Router | None:
        core = self.client.core
        return core if isinstance(core, Router) else None

    def place(self, job: Job) -> str:
        """Decide where each of the job's prompts runs (the X-Tokenfab-Replica header): with one engine, 0."""
        router = self.router
        if router is None:
            return ",".join("0" for _ in job.prompts)
        return ",".join(str(router.place(rid, p.token_ids)) for rid, p in zip(job.prompt_ids(), job.prompts))

    def replicas(self) -> list[dict]:
        """What /replicas shows: each engine core's state, load, KV use and price."""
        if self.router is not None:
            return self.router.describe()
        core, stats, info = self.client.core, self.client.stats, self.client.info
        return [
            {
                "id": 0,
                "state": "running" if core.alive else "dead",
                "reason": core.dead or "",
                "pid": getattr(core, "pid", None),
                "running": self.client.num_unfinished,
                "kv_usage": stats.kv.usage if stats is not None else 0.0,
                "prefix_hit_rate": stats.prefix_cache.hit_rate if stats is not None else 0.0,
                "usd_per_hour": info.usd_per_hour if info is not None else 0.0,
            }
        ]

    @property
    def tool_template(self) -> Template:
        return template_tools(self.tokenizer.special.chat_template, self.settings.tool_call_parser)

    @property
    def ready(self) -> bool:
        return self.client.alive and self.admission is not None and self.admission.accepting

    async def offload(self, fn: Callable[..., T], *args) -> T:
        """Run validation, templating and tokenization on the worker threads, so a long prompt does not stall
        the event loop (long texts are tokenized without the GIL)."""
        if self._workers is None:
            self._workers = ThreadPoolExecutor(self.settings.tokenizer_threads, thread_name_prefix="tokenize")
        return await asyncio.get_running_loop().run_in_executor(self._workers, fn, *args)

    async def start(self) -> None:
        await self.offload(self.tokenizer.warm)
        info = await self.client.start()
        self.started = time.time()
        logger.info(
            "engine ready: %s, weights %s, CPU kernels %s (%s), batch-invariant %s; CPU flags: %s",
            info.dtype,
            info.quantization,
            info.kernel_isa,
            info.kernel_isa_reason,
            info.batch_invariant,
            " ".join(info.cpu_flags),
        )
        self.metrics.set_prices(info.usd_per_hour, info.usd_per_kwh)
        s = self.settings
        self.admission = Admission(info.max_num_seqs + s.max_queued_requests, s.max_queued_tokens)
        log = RequestLog(s.request_log) if s.request_log else None
        self._generation = Generation(self.client, self.admission, self.metrics, s, log)

    async def stop(self) -> None:
        self.drain()
        await self.client.shutdown()
        if self._workers is not None:
            self._workers.shutdown(wait=False, cancel_futures=True)
        if self._generation is not None and self._generation.request_log is not None:
            self._generation.request_log.close()

    def drain(self) -> None:
        """Stop admitting; in-flight requests go on."""
        if self.admission is not None:
            self.admission.accepting = False
