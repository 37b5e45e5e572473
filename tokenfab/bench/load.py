"""Load generation: closed loop (fixed concurrency) or open loop (Poisson / gamma arrivals, optional ramp-up),
bounded in requests and time; agentic sessions as chains of turns with think time.

The first `warmup` requests are sent but not recorded. A point cut short by its time bound returns what it
completed; a cancelled one (Ctrl-C) raises, and the sweep keeps the points finished before it.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from dataclasses import dataclass

import httpx

from tokenfab.bench.client import stream_completion
from tokenfab.bench.records import RequestRecord
from tokenfab.bench.workloads import RequestSpec, SessionSpec


@dataclass(frozen=True, slots=True)
class LoadPlan:
    concurrency: int | None = None
    """Closed loop: this many requests in flight."""
    rate: float | None = None
    """Open loop: mean arrivals per second (None with concurrency set)."""
    burstiness: float = 1.0
    """Gamma shape of inter-arrival times: 1 is Poisson, < 1 burstier, > 1 smoother."""
    ramp_up_s: float = 0.0
    """Open loop: the rate grows linearly from ~0 to `rate` over this many seconds."""
    warmup: int = 0
    max_duration_s: float | None = None
    request_timeout_s: float = 600.0
    ignore_eos: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if (self.concurrency is None) == (self.rate is None):
            raise ValueError("give exactly one of concurrency (closed loop) and rate (open loop)")
        if self.concurrency is not None and self.concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if self.rate is not None and self.rate <= 0:
            raise ValueError("rate must be > 0")
        if self.burstiness <= 0:
            raise ValueError("burstiness must be > 0")


Progress = Callable[[RequestRecord], None]


class Run:
    """Collects records; stops admitting new requests at the time bound."""

    def __init__(self, plan: LoadPlan, progress: Progress | None) -> None:
        self.plan = plan
        self.records: list[RequestRecord] = []
        self.progress = progress
        self.started = time.monotonic()
        self._sent = 0

    def expired(self) -> bool:
        bound = self.plan.max_duration_s
        return bound is not None and time.monotonic() - self.started >= bound

    async def send(
        self,
        client: httpx.AsyncClient,
        model: str,
        prompt: str,
        prompt_tokens: int,
        max_tokens: int,
        session: str | None = None,
        turn: int = 0,
        sampling: dict | None = None,
    ) -> tuple[RequestRecord, str]:
        index = self._sent
        self._sent += 1
        record, text = await stream_completion(
            client,
            model,
            prompt,
            prompt_tokens,
            max_tokens,
            self.plan.ignore_eos,
            self.plan.request_timeout_s,
            session,
            turn,
            sampling,
        )
        if index >= self.plan.warmup:
            self.records.append(record)
            if self.progress is not None:
                self.progress(record)
        return record, text


async def run_requests(
    client: httpx.AsyncClient, model: str, specs: list[RequestSpec], plan: LoadPlan, progress: Progress | None = None
) -> list[RequestRecord]:
    run = Run(plan, progress)
    if plan.concurrency is not None:
        await _closed_loop(run, client, model, specs, plan.concurrency)
    else:
        await _open_loop(run, client, model, specs)
    return run.records


async def _closed_loop(
    run: Run, client: httpx.AsyncClient, model: str, specs: list[RequestSpec], concurrency: int
) -> None:
    queue = list(reversed(specs))

    async def worker() -> None:
        while queue and not run.expired():
            spec = queue.pop()
            await run.send(
                client, model, spec.prompt, spec.prompt_tokens, spec.max_tokens, spec.session, sampling=spec.sampling
            )

    await _all(worker() for _ in range(concurrency))


async def _open_loop(run: Run, client: httpx.AsyncClient, model: str, specs: list[RequestSpec]) -> None:
    plan = run.plan
    rng = random.Random(plan.seed)
    tasks = []
    elapsed = 0.0
    for spec in specs:
        if spec.arrival is not None:
            elapsed = spec.arrival
        else:
            elapsed += _gap(rng, plan, elapsed)
        delay = run.started + elapsed - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if run.expired():
            break
        tasks.append(
            asyncio.create_task(
                run.send(
                    client,
                    model,
                    spec.prompt,
                    spec.prompt_tokens,
                    spec.max_tokens,
                    spec.session,
                    sampling=spec.sampling,
                )
            )
        )
    await _all(tasks)


def _gap(rng: random.Random, plan: LoadPlan, elapsed: float) -> float:
    rate = plan.rate
    assert rate is not None, "an open-loop plan has a rate"
    if plan.ramp_up_s > 0 and elapsed < plan.ramp_up_s:
        rate = max(rate * elapsed / plan.ramp_up_s, rate * 0.05)
    return rng.gammavariate(plan.burstiness, 1.0 / (rate * plan.burstiness))


async def run_sessions(
    client: httpx.AsyncClient,
    model: str,
    sessions: list[SessionSpec],
    plan: LoadPlan,
    count_tokens: Callable[[str], int],
    progress: Progress | None = None,
) -> list[RequestRecord]:
    """Agentic sessions, `plan.concurrency` at a time: each turn appends a tool output to the conversation and
    the model's reply to it, then waits the session's think time before the next turn."""
    if plan.concurrency is None:
        raise ValueError("sessions run in a closed loop: give a concurrency")
    run = Run(plan, progress)
    queue = list(reversed(sessions))

    async def session_chain(s: SessionSpec) -> None:
        conversation = s.system
        for turn, (tool, reply_len) in enumerate(zip(s.tool_outputs, s.reply_tokens)):
            if run.expired():
                return
            conversation += "\n" + tool
            record, reply = await run.send(
                client, model, conversation, count_tokens(conversation), reply_len, s.session, turn
            )
            if not record.ok:
                return
            conversation += reply
            if s.think_time_s:
                await asyncio.sleep(s.think_time_s)

    async def worker() -> None:
        while queue and not run.expired():
            await session_chain(queue.pop())

    await _all(worker() for _ in range(plan.concurrency))
    return run.records


async def _all(coros) -> None:
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        await asyncio.gather(*tasks)
    finally:
        for t in tasks:
            t.cancel()
