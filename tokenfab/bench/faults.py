"""Faults under load, against a running `tokenfab serve --replicas N`: closed-loop clients keep sending requests
while one replica is killed (SIGKILL), another hangs (SIGSTOP until the router notices) and a third is drained
(`POST /replicas/{id}/drain`). What each request got and when each fault was noticed and mended is recorded, so a
test can check that nothing was lost and a benchmark can report what the faults cost.

The server must run on this machine (faults are signals to the replicas' pids from /replicas).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx


@dataclass(slots=True)
class Outcome:
    key: str
    """Which request (the same key asks the same thing)."""
    start: float
    end: float
    status: int | str
    """HTTP status; for a stream that ended in an error event, its code."""
    text: str


class ClosedLoop:
    """`workers` clients sending completions back to back (every other one streamed) until stopped. `requests`
    gives the n-th request as (key, JSON body)."""

    def __init__(self, url: str, requests: Callable[[int], tuple[str, dict]], workers: int = 6) -> None:
        self.url, self.requests, self.workers = url, requests, workers
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), name="closed-loop")

    def __enter__(self) -> ClosedLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(600)

    async def _run(self) -> None:
        async with httpx.AsyncClient(timeout=600) as http:
            await asyncio.gather(*(self._worker(http, w) for w in range(self.workers)))

    async def _worker(self, http: httpx.AsyncClient, w: int) -> None:
        n = w
        while not self._stop.is_set():
            key, body = self.requests(n)
            stream = n % 2 == 1
            n += self.workers
            start = time.monotonic()
            if not stream:
                r = await http.post(f"{self.url}/v1/completions", json=body)
                text = r.json()["choices"][0]["text"] if r.status_code == 200 else r.text
                self.outcomes.append(Outcome(key, start, time.monotonic(), r.status_code, text))
                continue
            async with http.stream("POST", f"{self.url}/v1/completions", json={**body, "stream": True}) as r:
                pieces: list[str] = []
                status: int | str = r.status_code
                async for line in r.aiter_lines():
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:
                            status = event["error"].get("code") or "error"
                        else:
                            pieces.append(event["choices"][0]["text"])
                self.outcomes.append(Outcome(key, start, time.monotonic(), status, "".join(pieces)))


def replicas(url: str) -> list[dict]:
    return httpx.get(f"{url}/replicas", timeout=10).json()["replicas"]


def wait_for(url: str, check: Callable[[list[dict]], bool], what: str, timeout: float = 300) -> float:
    """Poll /replicas until `check` holds; returns when it first did (time.monotonic)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check(replicas(url)):
            return time.monotonic()
        time.sleep(0.05)
    raise TimeoutError(f"timed out waiting for {what}: {replicas(url)}")


def busiest(url: str, among: set[int], timeout: float = 10, freeze: bool = False) -> dict:
    """The replica (of `among`) with the most sequences in flight, so that a fault there hits requests. With
    `freeze` it is left stopped (SIGSTOP) with sequences still in flight — they cannot finish between the look and
    the fault — and its row carries `frozen_at` (time.monotonic())."""
    deadline = time.monotonic() + timeout
    while True:
        rows = [r for r in replicas(url) if r["id"] in among]
        best = max(rows, key=lambda r: r["running"])
        if not best["running"] and time.monotonic() <= deadline:
            time.sleep(0.05)
            continue
        if not freeze:
            return best
        frozen_at = time.monotonic()
        os.kill(best["pid"], signal.SIGSTOP)
        time.sleep(0.2)  # what it sent before the stop reaches the router
        row = next(r for r in replicas(url) if r["id"] == best["id"])
        if row["running"] or time.monotonic() > deadline:
            return {**row, "frozen_at": frozen_at}
        os.kill(best["pid"], signal.SIGCONT)


@dataclass(slots=True)
class FaultLog:
    """What happened, in time.monotonic() seconds."""

    killed: int = -1
    hung: int = -1
    drained: int = -1
    events: dict[str, float] = field(default_factory=dict)
    """kill, restarted_killed, stop, hang_noticed, restarted_hung, drain, drained."""
    drain_reply: dict = field(default_factory=dict)

    @property
    def times(self) -> list[float]:
        """When a fault struck (kill, stop, drain)."""
        return [self.events[k] for k in ("kill", "stop", "drain") if k in self.events]

    def seconds(self) -> dict[str, float]:
        e = self.events
        return {
            "kill_to_restarted": e["restarted_killed"] - e["kill"],
            "stop_to_hang_noticed": e["hang_noticed"] - e["stop"],
            "stop_to_restarted": e["restarted_hung"] - e["stop"],
            "drain": e["drained"] - e["drain"],
        }


def kill_hang_drain(url: str, n: int = 3, settle: float = 1.0, before: float = 1.5) -> FaultLog:
    """Kill the busiest replica and wait for its restart; SIGSTOP the busiest other one until the router has noticed
    the hang and restarted it; drain the third. `settle` seconds of load between faults."""
    log, everyone = FaultLog(), set(range(n))
    time.sleep(before)
    victim = busiest(url, everyone, freeze=True)
    log.killed = k = victim["id"]
    log.events["kill"] = time.monotonic()
    os.kill(victim["pid"], signal.SIGKILL)
    log.events["restarted_killed"] = wait_for(
        url, lambda rows: rows[k]["state"] == "running" and rows[k]["restarts"] > victim["restarts"], "the restart"
    )
    time.sleep(settle)
    stopped = busiest(url, everyone - {k}, freeze=True)
    log.hung = h = stopped["id"]
    log.events["stop"] = stopped["frozen_at"]
    try:
        log.events["hang_noticed"] = wait_for(url, lambda rows: rows[h]["state"] != "running", "the hang")
    finally:
        if os.path.exists(f"/proc/{stopped['pid']}"):
            os.kill(stopped["pid"], signal.SIGCONT)
    log.events["restarted_hung"] = wait_for(
        url, lambda rows: rows[h]["state"] == "running" and rows[h]["restarts"] > stopped["restarts"], "the restart"
    )
    time.sleep(settle)
    log.drained = d = min(everyone - {k, h})
    log.events["drain"] = time.monotonic()
    reply = httpx.post(f"{url}/replicas/{d}/drain", timeout=120)
    log.events["drained"] = time.monotonic()
    reply.raise_for_status()
    log.drain_reply = reply.json()
    time.sleep(settle)
    return log
