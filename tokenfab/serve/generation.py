"""Generation: one API request's trip through the engine — admission, fan-out over prompts, timeout, metrics.

Completions and chat both come here with token-id prompts and SamplingParams; they get back (prompt index,
cumulative RequestOutput) pairs as the engine produces them. Leaving the iterator early (client gone, timeout,
error) aborts every sequence of the request in the engine and frees its KV blocks; the admission ticket taken
by `admit` (before a stream's first byte, so overload is a 429 and not a broken 200) is returned whatever happens.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

from tokenfab.engine.types import RequestOutput, SamplingParams
from tokenfab.serve.admission import Admission, Ticket
from tokenfab.serve.engine_client import AsyncEngineClient, EngineDead
from tokenfab.serve.errors import APIError, bad_request
from tokenfab.serve.formatting import usage
from tokenfab.serve.metrics import ServerMetrics
from tokenfab.serve.request_log import RequestLog
from tokenfab.serve.settings import ServerSettings
from tokenfab.serve.tools import ToolPlan


@dataclass(frozen=True, slots=True)
class Prompt:
    text: str | None
    token_ids: list[int]


@dataclass(frozen=True, slots=True)
class Job:
    request_id: str
    prompts: list[Prompt]
    params: SamplingParams
    priority: int = 0
    user: str | None = None
    """The caller's end-user id (OpenAI `user`), written to the request log with the request's cost."""
    tools: ToolPlan | None = None
    """A chat request's tool calling: how its replies are read (None: plain content)."""
    session: str | None = None
    """The agent session it is a turn of (the request extension `session.id`), written to the request log."""

    def prompt_ids(self) -> list[str]:
        """The engine request id of each prompt."""
        if len(self.prompts) == 1:
            return [self.request_id]
        return [f"{self.request_id}-{i}" for i in range(len(self.prompts))]


class _Done:
    """Sentinel a pump puts when its prompt is finished."""


class Generation:
    def __init__(
        self,
        client: AsyncEngineClient,
        admission: Admission,
        metrics: ServerMetrics,
        settings: ServerSettings,
        request_log: RequestLog | None = None,
    ) -> None:
        self.client = client
        self.admission = admission
        self.metrics = metrics
        self.settings = settings
        self.request_log = request_log

    def admit(self, job: Job) -> Ticket:
        """Reserve room for the job (each prompt's n sequences count as requests) or raise 429 (503 draining)."""
        n = job.params.n
        return self.admission.admit(sum(len(p.token_ids) for p in job.prompts) * n, len(job.prompts) * n)

    async def run(self, job: Job, ticket: Ticket) -> AsyncIterator[tuple[int, RequestOutput]]:
        """The job's outputs as they grow; the ticket is released when this ends, however it ends."""
        queue: asyncio.Queue = asyncio.Queue()
        ids = job.prompt_ids()
        tasks = [asyncio.create_task(self._pump(job, i, ids[i], p, queue)) for i, p in enumerate(job.prompts)]
        latest: dict[int, RequestOutput] = {}
        start, status = time.monotonic(), "aborted"
        try:
            async with asyncio.timeout(self.settings.request_timeout):
                remaining = len(tasks)
                while remaining:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    if isinstance(item, _Done):
                        remaining -= 1
                        continue
                    latest[item[0]] = item[1]
                    yield item
            status = "ok"
        except TimeoutError:
            status = "timeout"
            raise APIError(
                504,
                f"the request did not finish within {self.settings.request_timeout:g} s and was aborted",
                "timeout_error",
                code="request_timeout",
            ) from None
        except APIError:
            status = "error"
            raise
        except EngineDead as e:
            status = "engine_unavailable"
            raise APIError(
                503, f"the engine is not available: {e}", "service_unavailable", code="engine_unavailable"
            ) from None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.admission.release(ticket)
            if self.request_log is not None:
                energy = self.client.info.energy_source if self.client.info else "modelled"
                outputs = [latest[i] for i in sorted(latest)]
                self.request_log.write(
                    job.request_id, job.user, status, usage(outputs, energy), time.monotonic() - start, job.session
                )

    async def _pump(self, job: Job, index: int, request_id: str, prompt: Prompt, queue: asyncio.Queue) -> None:
        last_time, last_count = time.monotonic(), 0
        try:
            async for out in self.client.generate(request_id, prompt.token_ids, job.params, prompt.text, job.priority):
                if out.error is not None:
                    raise bad_request(out.error, "prompt")
                now = time.monotonic()
                count = sum(len(c.token_ids) for c in out.outputs)
                if count > last_count:
                    if last_count == 0:
                        self.metrics.observe_first_token(out)
                    else:
                        self.metrics.observe_gap(now - last_time, count - last_count)
                    last_time, last_count = now, count
                if out.finished:
                    self.metrics.observe_finished(out, now)
                queue.put_nowait((index, out))
            queue.put_nowait(_Done())
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # noqa: BLE001 - handed to the request's consumer, which raises it
            queue.put_nowait(e)
