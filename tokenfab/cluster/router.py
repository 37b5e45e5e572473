"""Router: an EngineClient over several replicas (engine cores), so the front end serves them as one engine.

Each request (its n siblings together) goes to the replica its policy picks (tokenfab.cluster.policies); the
router remembers where every sequence runs, routes its aborts there, and merges the replicas' step results into
one stream whose stats are the replicas' summed. It keeps per replica the prefill work it has sent and not yet
seen start (what a policy counts as queued: the replicas' own stats arrive a step late) and a step-cost fit from
the replica's stats. Replicas publish KV events; the kv policy reads them through a KvIndex. A replica that dies
ends the router (requests on it fail with 503; migration to a survivor is not built yet).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tokenfab.cluster.kv_index import KvIndex, prompt_blocks
from tokenfab.cluster.policies import Decision, ReplicaLoad, RoutingPolicy
from tokenfab.engine.client import EngineClient, EngineDead
from tokenfab.engine.ipc import FromCore, StepResult
from tokenfab.engine.messages import CoreInfo, CoreOutput, CoreRequest
from tokenfab.engine.stats import CostStats, EngineStats, KVStats, PrefixCacheStats, SchedulerStats, SpecStats

log = logging.getLogger("tokenfab.cluster")
PLANNED = 4096
PLAN_TTL = 10.0
"""Seconds a placement waits for its request to be added (admitted requests are added at once)."""


class StepCost:
    """A replica's step time = overhead + per_token x tokens in the step, fitted by least squares over its own
    recent steps (exponentially forgotten, DECAY per step). While its steps are all alike (a run of decodes, where
    the token count barely varies) the slope is held near the last one the data determined, so the per-token cost
    of a prefill is not read off decode steps, whose time is mostly overhead."""

    DECAY = 0.98
    HOLD = 64.0**2
    """Weight of the held slope: as much as one step lying 64 tokens off the mean."""

    def __init__(self, overhead: float = 0.002, per_token: float = 1 / 2000) -> None:
        self.overhead, self.per_token = overhead, per_token
        self._held = per_token
        self._w = self._x = self._y = self._xx = self._xy = 0.0

    def observe(self, steps: int, tokens: int, seconds: float) -> None:
        if steps <= 0 or tokens <= 0 or seconds <= 0:
            return
        x, y, forget = tokens / steps, seconds / steps, self.DECAY**steps
        self._w = self._w * forget + steps
        self._x = self._x * forget + steps * x
        self._y = self._y * forget + steps * y
        self._xx = self._xx * forget + steps * x * x
        self._xy = self._xy * forget + steps * x * y
        mean_x, mean_y = self._x / self._w, self._y / self._w
        spread = self._xx - self._w * mean_x * mean_x
        slope = (self._xy - self._w * mean_x * mean_y + self.HOLD * self._held) / (spread + self.HOLD)
        self.per_token = max(slope, 1e-7)
        self.overhead = max(mean_y - self.per_token * mean_x, 0.0)
        if spread > 10 * self.HOLD:
            self._held = self.per_token


@dataclass(slots=True)
class Replica:
    """One engine core behind the router, and what the router knows of it."""

    index: int
    client: EngineClient
    waiting_prefill: dict[str, int] = field(default_factory=dict)
    """Sequence id -> its predicted uncached prompt tokens, until its first token comes back."""
    predicted: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Sequence id -> (when it was sent, the TTFT its routing decision predicted), until its first token."""
    running: set[str] = field(default_factory=set)
    cost: StepCost = field(default_factory=StepCost)
    routed: int = 0
    _last: EngineStats | None = None

    def load(self) -> ReplicaLoad:
        usd = self.client.info.usd_per_hour if self.client.info is not None else 0.0
        return ReplicaLoad(
            self.index,
            len(self.running),
            sum(self.waiting_prefill.values()),
            prefill_tokens_per_s=1 / self.cost.per_token,
            decode_seconds_per_seq=self.cost.per_token,
            step_seconds=self.cost.overhead,
            usd_per_hour=usd,
        )

    def observe(self, stats: EngineStats) -> None:
        last, self._last = self._last, stats
        if last is not None:
            self.cost.observe(
                stats.scheduler.steps - last.scheduler.steps,
                stats.scheduler.tokens_computed - last.scheduler.tokens_computed,
                stats.cost.busy_seconds - last.cost.busy_seconds,
            )


class Router(EngineClient):
    def __init__(self, clients: list[EngineClient], policy: RoutingPolicy) -> None:
        super().__init__()
        if not clients:
            raise ValueError("a router needs at least one replica")
        self.replicas = [Replica(i, c) for i, c in enumerate(clients)]
        self.policy = policy
        self.index = KvIndex()
        self.decisions: Counter[str] = Counter()
        """Decisions by reason."""
        self.ttft_seconds = {"predicted": 0.0, "actual": 0.0}
        """Summed over first tokens: the TTFT the kv policy predicted, and the one that came (router to token)."""
        self._predictions: dict[str, float] = {}
        self._owner: dict[str, Replica] = {}
        self._planned: OrderedDict[str, tuple[Replica, float, list[int]]] = OrderedDict()
        """Request id -> where `place` decided it runs, when, and its prompt's block hashes (dropped after
        PLAN_TTL: a refused request)."""
        self._results: asyncio.Queue[tuple[Replica, StepResult] | EngineDead] = asyncio.Queue()
        self._readers: list[asyncio.Task] = []

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self, timeout: float = 600.0) -> CoreInfo:
        infos = await asyncio.gather(*(r.client.start(timeout) for r in self.replicas))
        for r, info in zip(self.replicas, infos):
            if info.kv_events_endpoint is not None:
                self.index.follow(r.index, info.kv_events_endpoint, info.kv_events_replay_endpoint)
        self._readers = [asyncio.create_task(self._read(r), name=f"replica-{r.index}") for r in self.replicas]
        first = infos[0]
        self.info = msgspec.structs.replace(
            first,
            max_num_seqs=sum(i.max_num_seqs for i in infos),
            kv_capacity_tokens=min(i.kv_capacity_tokens for i in infos),
            usd_per_hour=sum(i.usd_per_hour for i in infos),
            kv_events_endpoint=None,
            kv_events_replay_endpoint=None,
        )
        return self.info

    @property
    def alive(self) -> bool:
        return self.dead is None and all(r.client.alive for r in self.replicas)

    async def shutdown(self, timeout: float = 10.0) -> None:
        await asyncio.gather(*(r.client.shutdown(timeout) for r in self.replicas), return_exceptions=True)
        for task in self._readers:
            task.cancel()
        self.index.close()

    # -- routing ------------------------------------------------------------------------------------------------

    def place(self, request_id: str, prompt_token_ids: list[int]) -> int:
        """Decide now where the request will run (its response can name the replica before it starts). Its load
        counts on that replica from now on, so requests placed in a burst see each other."""
        self._expire_plans()
        blocks = prompt_blocks(prompt_token_ids, self._block_size)
        replica = self._route(blocks, len(prompt_token_ids), request_id)
        self._planned[request_id] = (replica, time.monotonic(), blocks)
        replica.running.add(request_id)
        replica.waiting_prefill[request_id] = self._uncached(replica, blocks, len(prompt_token_ids))
        return replica.index

    def _expire_plans(self) -> None:
        """Forget placements never added (the request was refused after `place`) and the load they held."""
        now = time.monotonic()
        while self._planned:
            request_id, (replica, at, _) = next(iter(self._planned.items()))
            if now - at < PLAN_TTL and len(self._planned) < PLANNED:
                return
            del self._planned[request_id]
            replica.running.discard(request_id)
            replica.waiting_prefill.pop(request_id, None)

    async def add(self, requests: list[CoreRequest]) -> None:
        groups: dict[str, list[CoreRequest]] = {}
        for req in requests:
            groups.setdefault(req.request_id.split("#")[0], []).append(req)
        for group_id, group in groups.items():
            prompt = group[0].prompt_token_ids
            plan = self._planned.pop(group_id, None)
            if plan is not None:
                replica, _, blocks = plan
                replica.running.discard(group_id)
                uncached = replica.waiting_prefill.pop(group_id, 1)
            else:
                blocks = prompt_blocks(prompt, self._block_size)
                replica = self._route(blocks, len(prompt), group_id)
                uncached = self._uncached(replica, blocks, len(prompt))
            predicted = self._predictions.pop(group_id, None)
            for req in group:
                self._owner[req.request_id] = replica
                replica.waiting_prefill[req.request_id] = uncached if req is group[0] else 1
                replica.running.add(req.request_id)
            if predicted is not None:
                replica.predicted[group[0].request_id] = (time.monotonic(), predicted)
            replica.routed += len(group)
            self.policy.sent(replica.index, blocks)
            await replica.client.add(group)

    def _uncached(self, replica: Replica, blocks: list[int], prompt_len: int) -> int:
        return max(prompt_len - self._cached(replica, blocks) * self._block_size, 1)

    async def abort(self, request_ids: list[str]) -> None:
        by_replica: dict[int, list[str]] = {}
        for rid in request_ids:
            replica = self._owner.get(rid)
            if replica is not None:
                by_replica.setdefault(replica.index, []).append(rid)
        for index, ids in by_replica.items():
            await self.replicas[index].client.abort(ids)

    def _route(self, blocks: list[int], prompt_len: int, request_id: str) -> Replica:
        live = [r for r in self.replicas if r.client.alive]
        if not live:
            raise EngineDead("no replica is running")
        if self.policy.uses_kv_index:
            self.index.refresh()
        loads = [r.load() for r in live]
        for load, r in zip(loads, live):
            load.cached_blocks = self._cached(r, blocks)
        decision: Decision = self.policy.choose(blocks, prompt_len, self._block_size, loads)
        self.decisions[f"{self.policy.name}: {decision.reason.split(',')[0]}"] += 1
        if decision.predicted_ttft is not None:
            self._predictions[request_id] = decision.predicted_ttft
            while len(self._predictions) > PLANNED:
                self._predictions.pop(next(iter(self._predictions)))
        return self.replicas[decision.replica]

    def _cached(self, replica: Replica, blocks: list[int]) -> int:
        return self.index.overlap(replica.index, blocks) if self.policy.uses_kv_index else 0

    @property
    def _block_size(self) -> int:
        return self.info.block_size if self.info is not None else 16

    # -- results ------------------------------------------------------------------------------------------------

    async def _read(self, replica: Replica) -> None:
        try:
            async for result in replica.client.results():
                replica.observe(result.stats)
                self._results.put_nowait((replica, result))
        except EngineDead as e:
            self._results.put_nowait(EngineDead(f"replica {replica.index}: {e}"))

    async def _next(self) -> FromCore:
        item = await self._results.get()
        if isinstance(item, EngineDead):
            raise item
        replica, result = item
        for out in result.outputs:
            self._settle(replica, out)
        return StepResult(result.outputs, self.merged_stats())

    def _settle(self, replica: Replica, out: CoreOutput) -> None:
        if out.new_token_ids or out.finish_reason is not None:
            replica.waiting_prefill.pop(out.request_id, None)
            sent = replica.predicted.pop(out.request_id, None)
            if sent is not None and out.new_token_ids:
                self.ttft_seconds["predicted"] += sent[1]
                self.ttft_seconds["actual"] += time.monotonic() - sent[0]
        if out.finish_reason is not None:
            replica.running.discard(out.request_id)
            self._owner.pop(out.request_id, None)

    def merged_stats(self) -> EngineStats:
        """The replicas' latest stats summed (KV usage recomputed from the summed blocks)."""
        parts = [r.client.stats for r in self.replicas if r.client.stats is not None]
        total = _sum_structs(parts)
        used = total.kv.total_blocks - total.kv.free_blocks
        kv = msgspec.structs.replace(total.kv, usage=used / total.kv.total_blocks if total.kv.total_blocks else 0.0)
        return msgspec.structs.replace(total, time=max(p.time for p in parts) if parts else time.monotonic(), kv=kv)

    def describe(self) -> list[dict]:
        """Per replica: what /replicas shows (the index brought up to the events that have arrived)."""
        self.index.refresh()
        rows = []
        for r in self.replicas:
            info, stats = r.client.info, r.client.stats
            rows.append(
                {
                    "id": r.index,
                    "host": getattr(r.client, "node", None) or socket.gethostname(),
                    "pid": getattr(r.client, "pid", None),
                    "role": "aggregated",
                    "state": "running" if r.client.alive else f"dead: {r.client.dead}",
                    "running": len(r.running),
                    "waiting_prefill_tokens": sum(r.waiting_prefill.values()),
                    "routed": r.routed,
                    "kv_usage": stats.kv.usage if stats is not None else 0.0,
                    "cached_blocks": len(self.index.blocks(r.index)),
                    "prefix_hit_rate": stats.prefix_cache.hit_rate if stats is not None else 0.0,
                    "usd_per_hour": info.usd_per_hour if info is not None else 0.0,
                    "seconds_per_token": r.cost.per_token,
                    "seconds_per_step": r.cost.overhead,
                }
            )
        return rows


def _sum_structs(parts: list) -> Any:
    """Field by field: numbers added, anything else taken from the first."""
    if not parts:
        return EngineStats(time.monotonic(), SchedulerStats(), KVStats(), PrefixCacheStats(), SpecStats(), CostStats())
    first = parts[0]
    values = {}
    for name in first.__struct_fields__:
        items = [getattr(p, name) for p in parts]
        head = items[0]
        if isinstance(head, msgspec.Struct):
            values[name] = _sum_structs(items)
        elif isinstance(head, (int, float)) and not isinstance(head, bool):
            values[name] = sum(items)
        else:
            values[name] = head
    return type(first)(**values)
