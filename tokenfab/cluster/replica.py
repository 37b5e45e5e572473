"""What the router knows of each replica (its load, step-cost fit, health state) and of each sequence in flight
(enough to continue it on another replica), and how their stats and costs add up."""

from __future__ import annotations

import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tokenfab.cluster.policies import ReplicaLoad
from tokenfab.economics.attribution import RequestCost
from tokenfab.engine.client import EngineClient
from tokenfab.engine.messages import CoreRequest
from tokenfab.engine.stats import CostStats, EngineStats, KVStats, PrefixCacheStats, SchedulerStats, SpecStats

Factory = Callable[[], EngineClient]


class StepCost:
    """A replica's step time = overhead + per_token x prompt tokens + per_seq x decode tokens in the step, fitted by
    least squares over its own recent steps (exponentially forgotten, DECAY per step). Each slope is held near the
    last value the data determined while the steps do not vary in its feature (a run of decodes says nothing of a
    prefill's per-token cost; a run of prefills at one batch size nothing of what a sequence adds to a decode), so
    neither is read off steps whose time is mostly overhead. A decode token costs what a prompt token does until the
    replica's steps have told them apart."""

    DECAY = 0.98
    HOLD = 64.0**2
    """Weight of the held per-token slope: as much as one step lying 64 prompt tokens off the mean..."""
    HOLD_SEQ = 4.0**2
    """...and of the held per-sequence slope: one step lying 4 decoding sequences off the mean."""

    def __init__(self, overhead: float = 0.002, per_token: float = 1 / 2000, per_seq: float | None = None) -> None:
        self.overhead, self.per_token = overhead, per_token
        self.per_seq = per_token if per_seq is None else per_seq
        self._held = [self.per_token, self.per_seq]
        self._sums = [0.0] * 9
        """Forgotten weighted sums: w, p, d, y, pp, dd, pd, py, dy (p, d: prompt and decode tokens per step)."""

    @staticmethod
    def measured(directory: str) -> tuple[float, float, float]:
        """(overhead, per_token, per_seq) from a `tokenfab profile` directory's step_cost.json (its fitted step
        time's fixed part, prefill token and decoding sequence terms)."""
        with open(os.path.join(directory, "step_cost.json")) as f:
            coef = json.load(f)["coef"]
        return float(coef["overhead"]), max(float(coef["prefill_tokens"]), 1e-7), max(float(coef["decode_seqs"]), 1e-7)

    def observe(self, steps: int, tokens: int, seconds: float, prompt_tokens: int | None = None) -> None:
        """`steps` steps ran `tokens` tokens in `seconds`; `prompt_tokens` of them were prompt tokens (None: all)."""
        if steps <= 0 or tokens <= 0 or seconds <= 0:
            return
        prompt = tokens if prompt_tokens is None else min(max(prompt_tokens, 0), tokens)
        p, d, y, forget = prompt / steps, (tokens - prompt) / steps, seconds / steps, self.DECAY**steps
        terms = (1.0, p, d, y, p * p, d * d, p * d, p * y, d * y)
        self._sums = [s * forget + steps * t for s, t in zip(self._sums, terms)]
        w, sp, sd, sy, spp, sdd, spd, spy, sdy = self._sums
        mp, md, my = sp / w, sd / w, sy / w
        # Centred (co)variances, then the two slopes with each pulled towards its held value (2 x 2 ridge system).
        vpp, vdd, vpd = spp - w * mp * mp, sdd - w * md * md, spd - w * mp * md
        cpy, cdy = spy - w * mp * my, sdy - w * md * my
        a11, a22, a12 = vpp + self.HOLD, vdd + self.HOLD_SEQ, vpd
        b1, b2 = cpy + self.HOLD * self._held[0], cdy + self.HOLD_SEQ * self._held[1]
        det = a11 * a22 - a12 * a12
        self.per_token = max((b1 * a22 - b2 * a12) / det, 1e-7)
        self.per_seq = max((a11 * b2 - a12 * b1) / det, 1e-7)
        self.overhead = max(my - self.per_token * mp - self.per_seq * md, 0.0)
        if vpp > 10 * self.HOLD:
            self._held[0] = self.per_token
        if vdd > 10 * self.HOLD_SEQ:
            self._held[1] = self.per_seq


class PaidTime:
    """Replica time paid for: seconds summed over the replicas paid for, tallied at each update with the count as
    it was at the update before."""

    def __init__(self, paid: int = 0) -> None:
        self.total, self._at, self._paid = 0.0, time.monotonic(), paid

    def update(self, paid: int) -> float:
        now = time.monotonic()
        self.total += (now - self._at) * self._paid
        self._at, self._paid = now, paid
        return self.total


@dataclass(slots=True)
class Replica:
    """One engine core behind the router, and what the router knows of it."""

    index: int
    client: EngineClient
    factory: Factory | None = None
    """Makes a fresh client for this replica (a restart); None: it cannot be restarted."""
    state: str = "starting"
    """starting | running | draining | stopped (drained) | restarting | dead (for good)."""
    reason: str = ""
    """Why it last stopped running."""
    waiting_prefill: dict[str, int] = field(default_factory=dict)
    """Sequence id -> its predicted uncached prompt tokens, until its first token comes back."""
    predicted: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Sequence id -> (when it was sent, the TTFT its routing decision predicted), until its first token."""
    running: set[str] = field(default_factory=set)
    cost: StepCost = field(default_factory=StepCost)
    routed: int = 0
    restarts: int = 0
    failures: int = 0
    """Consecutive lives that ended in failure (the restart backoff's step)."""
    migrated_away: int = 0
    probation: int = 0
    """Sequences it must finish before it takes more than one at a time (after a restart)."""
    role: str = "both"
    """both (aggregated), prefill (only prefill legs of disaggregated requests) or decode."""
    up_since: float = 0.0
    last_progress: float = 0.0
    """When it last sent a step, or became busy."""
    _last: EngineStats | None = None

    @property
    def live(self) -> bool:
        """Takes new work."""
        return self.state == "running" and self.client.alive

    def load(self) -> ReplicaLoad:
        usd = self.client.info.usd_per_hour if self.client.info is not None else 0.0
        return ReplicaLoad(
            self.index,
            len(self.running),
            sum(self.waiting_prefill.values()),
            prefill_tokens_per_s=1 / self.cost.per_token,
            decode_seconds_per_seq=self.cost.per_seq,
            step_seconds=self.cost.overhead,
            usd_per_hour=usd,
        )

    def describe(self, now: float, cached_blocks: int, kv_event_lag: float | None) -> dict:
        """Its row of /replicas (`cached_blocks` and `kv_event_lag` from the router's KV index)."""
        info, stats = self.client.info, self.client.stats
        return {
            "id": self.index,
            "host": getattr(self.client, "node", None) or socket.gethostname(),
            "pid": getattr(self.client, "pid", None),
            "ray_node_id": getattr(self.client, "node_id", None),
            "role": "aggregated" if self.role == "both" else self.role,
            "state": self.state,
            "reason": self.reason,
            "restarts": self.restarts,
            "probation": self.probation,
            "migrated_away": self.migrated_away,
            "last_step_age_s": round(now - self.last_progress, 3) if self.state == "running" else None,
            "running": len(self.running),
            "waiting_prefill_tokens": sum(self.waiting_prefill.values()),
            "routed": self.routed,
            "kv_usage": stats.kv.usage if stats is not None and self.live else 0.0,
            "cached_blocks": cached_blocks,
            "kv_event_lag_s": kv_event_lag,
            "prefix_hit_rate": stats.prefix_cache.hit_rate if stats is not None else 0.0,
            "usd_per_hour": info.usd_per_hour if info is not None else 0.0,
            "seconds_per_token": self.cost.per_token,
            "seconds_per_sequence": self.cost.per_seq,
            "seconds_per_step": self.cost.overhead,
        }

    def observe(self, stats: EngineStats) -> None:
        last, self._last = self._last, stats
        if last is not None:
            self.cost.observe(
                stats.scheduler.steps - last.scheduler.steps,
                stats.scheduler.tokens_computed - last.scheduler.tokens_computed,
                stats.cost.busy_seconds - last.cost.busy_seconds,
                stats.scheduler.prompt_tokens_computed - last.scheduler.prompt_tokens_computed,
            )

    def forget_work(self) -> None:
        self.running.clear()
        self.waiting_prefill.clear()
        self.predicted.clear()
        self._last = None


@dataclass(slots=True)
class Flight:
    """A sequence in flight, and what the router needs to continue it on another replica."""

    request: CoreRequest
    """As the front end added it."""
    replica: Replica
    generated: list[int] = field(default_factory=list)
    """Tokens passed on to the front end so far."""
    carried: RequestCost | None = None
    """Cost on the replicas it has left."""
    cost: RequestCost | None = None
    """Its latest cumulative cost on the current replica."""
    cached_tokens: int | None = None
    """Prompt tokens its first replica found cached (what usage reports)."""
    migrations: int = 0
    pending: bool = False
    """Its prompt is being computed on a prefill replica: not sent to `replica` yet."""
    first_at: float | None = None
    """When its first token came back."""


def plus_cost(a: RequestCost | None, b: RequestCost) -> RequestCost:
    total = RequestCost(b.usd, b.joules, b.device_seconds)
    if a is not None:
        total.add(a)
    return total


def sum_stats(parts: list) -> Any:
    """Field by field: numbers added, anything else taken from the first."""
    if not parts:
        return EngineStats(time.monotonic(), SchedulerStats(), KVStats(), PrefixCacheStats(), SpecStats(), CostStats())
    first = parts[0]
    values = {}
    for name in first.__struct_fields__:
        items = [getattr(p, name) for p in parts]
        head = items[0]
        if isinstance(head, msgspec.Struct):
            values[name] = sum_stats(items)
        else:
            values[name] = _sum_values(items)
    return type(first)(**values)


def _sum_values(items: list) -> Any:
    """Numbers added; equal-length lists (of numbers or lists) added element by element; else the first."""
    head = items[0]
    if isinstance(head, (int, float)) and not isinstance(head, bool):
        return sum(items)
    if isinstance(head, list) and all(isinstance(i, list) and len(i) == len(head) for i in items):
        return [_sum_values(list(column)) for column in zip(*items)]
    return head
