"""Prefill/decode disaggregation in the router: whether a request's prompt is computed on a prefill replica, and
its prefill leg.

Replicas have roles: `prefill` replicas run only prefill legs, `decode` replicas the requests themselves, and
`both` (an aggregated replica) anything. A request goes to a decode (or aggregated) replica as usual; then, per
request, `choose_prefill` decides whether its prompt is computed on a prefill replica first. The decision is from
the replicas' measured step costs (`StepCost`), not constants:

- local when the uncached part of the prompt is short (under two blocks: nothing worth moving);
- remote when the prefill replica's predicted time to first token (its queued prefill + this prompt there + the
  transfer) is no later than the decode replica's own (its queued prefill + this prompt);
- remote, too, when the decode replica is decoding and computing the prompt there would stall its sequences for
  longer than one of its steps takes, as long as the prefill replica still meets the TTFT SLO (`--slo-ttft`, else
  DEFAULT_SLO_TTFT): a prefill queue past it is not traded for the decoders' smoother tokens;
- local otherwise (a long prefill queue).

The prefill leg is the prompt with max_tokens 1 and `do_remote_decode`: the prefill replica computes it, holds its
blocks and answers with the `kv_transfer_params` the decode replica pulls them with. A leg that fails (its replica
dies, it errs, it takes longer than the timeout) leaves the request to compute its prompt on the decode replica:
never lost, never wrong. The leg's cost is added to the request's.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, deque
from dataclasses import dataclass, field

from tokenfab.cluster.replica import Replica
from tokenfab.engine.messages import CoreOutput, CoreRequest
from tokenfab.engine.types import KVTransferParams, SamplingParams

log = logging.getLogger("tokenfab.cluster")
ROLES = ("both", "prefill", "decode")
MIN_REMOTE_BLOCKS = 2
"""Uncached blocks below which a prompt is always computed where it decodes."""
DEFAULT_SLO_TTFT = 2.0
"""Seconds to first token a prefill replica's queue may reach when no --slo-ttft is given."""
DEFAULT_SLO_TPOT = 0.1
"""Seconds per output token `auto` holds the replicas to when no --slo-tpot is given."""
PRIOR_TRANSFER_SECONDS_PER_TOKEN = 2e-6
"""Per prompt token moved, until a decode replica has measured a pull."""


def takes_requests(role: str) -> bool:
    return role in ("both", "decode")


@dataclass(slots=True)
class Leg:
    """A request's prefill leg in flight on a prefill replica."""

    group_id: str
    replica: Replica
    done: asyncio.Future[CoreOutput | None]


@dataclass(slots=True)
class Disaggregation:
    """The router's prefill legs in flight and its decisions."""

    timeout_s: float = 120.0
    """A prefill leg taking longer is abandoned (the decode replica computes the prompt)."""
    slo_ttft: float | None = None
    always: bool = False
    """Every prompt of at least MIN_REMOTE_BLOCKS uncached blocks goes to a prefill replica (the least loaded by
    predicted TTFT), whatever the step costs say."""
    roles: RoleSwitch | None = None
    """With `--disaggregation auto`: when to turn a replica into a prefill replica and back."""
    legs: dict[str, Leg] = field(default_factory=dict)
    decisions: Counter[str] = field(default_factory=Counter)
    """remote; local (short): too few uncached blocks; local (sooner here): the decode replica predicted no later
    and no stall worth a remote queue; fallback: a leg that failed."""

    def choose_prefill(
        self, decode: Replica, uncached: int, block_size: int, candidates: list[tuple[Replica, int]]
    ) -> Replica | None:
        """The prefill replica to compute the prompt on, or None (computed on `decode`). `uncached`: the prompt's
        tokens the decode replica lacks; `candidates`: live prefill replicas with the prompt's tokens each lacks."""
        if not candidates:
            return None
        if uncached < MIN_REMOTE_BLOCKS * block_size:
            self.decisions["local (short)"] += 1
            return None
        d = decode.cost
        local = d.overhead + (sum(decode.waiting_prefill.values()) + uncached) * d.per_token
        transfer = uncached * transfer_seconds_per_token(decode)

        def remote_ttft(item: tuple[Replica, int]) -> float:
            r, lacking = item
            return r.cost.overhead + (sum(r.waiting_prefill.values()) + lacking) * r.cost.per_token + transfer

        best, best_ttft = min(((c, remote_ttft(c)) for c in candidates), key=lambda x: x[1])
        stall = uncached * d.per_token
        decoding = bool(decode.running)
        slo = self.slo_ttft if self.slo_ttft is not None else DEFAULT_SLO_TTFT
        if self.always or best_ttft <= local or (decoding and stall > d.overhead and best_ttft <= slo):
            self.decisions["remote"] += 1
            return best[0]
        self.decisions["local (sooner here)"] += 1
        return None

    def leg(self, leader: CoreRequest) -> CoreRequest:
        """The prefill leg of a request (its n siblings share it)."""
        return CoreRequest(
            f"{leader.request_id.split('#')[0]}@prefill",
            leader.prompt_token_ids,
            SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True),
            leader.arrival,
            leader.priority,
            eos_token_ids=leader.eos_token_ids,
            kv_transfer=KVTransferParams(do_remote_decode=True),
        )

    def open(self, leg_id: str, group_id: str, replica: Replica) -> Leg:
        leg = Leg(group_id, replica, asyncio.get_running_loop().create_future())
        self.legs[leg_id] = leg
        return leg

    def settle(self, out: CoreOutput) -> bool:
        """Take a prefill leg's output (True); False for any other sequence's."""
        leg = self.legs.get(out.request_id)
        if leg is None:
            return False
        if out.finish_reason is not None:
            del self.legs[out.request_id]
            if not leg.done.done():
                leg.done.set_result(out)
        return True

    def fail(self, replica: Replica) -> list[str]:
        """The replica was lost: its legs end without a result (their requests compute their prompts)."""
        lost = [leg_id for leg_id, leg in self.legs.items() if leg.replica is replica]
        for leg_id in lost:
            leg = self.legs.pop(leg_id)
            if not leg.done.done():
                leg.done.set_result(None)
        return lost

    def params(self, out: CoreOutput | None) -> KVTransferParams | None:
        """What the decode replica pulls with, or None (counted as a fallback) when the leg failed."""
        if out is None or out.error is not None or out.kv_transfer is None:
            self.decisions["fallback"] += 1
            return None
        return out.kv_transfer


def transfer_seconds_per_token(decode: Replica) -> float:
    """Seconds the decode replica has measured per prompt token pulled (a prior until it has pulled)."""
    stats = decode.client.stats
    if stats is None or stats.transfer.pulled_blocks == 0:
        return PRIOR_TRANSFER_SECONDS_PER_TOKEN
    info = decode.client.info
    block_size = info.block_size if info is not None else 16
    return stats.transfer.pull_seconds / (stats.transfer.pulled_blocks * block_size)


@dataclass(slots=True)
class RoleSwitch:
    """`--disaggregation auto`: which serves the load better now, the replicas aggregated or one of them computing
    only prompts (split), judged on the requests that finish: over the last `window_s` since the last switch (at
    least `min_samples` of them), the share meeting both SLOs (goodput) and the shares missing each.

    A mode not tried lately is tried when the misses point to it: split when TPOT misses (decoders stalled by
    prompts) reach `miss_share` and outnumber TTFT misses while one replica could carry the prompts; aggregated
    when, split, TTFT misses (the prefill replica's queue) do, or the prefill replica is nearly always busy. The
    goodput a mode had when it was left is remembered for `memory_s`: while remembered, the router goes back to it
    only when it beat the current mode's by `margin`, so a switch that did not pay is undone once and not tried
    again for a while (no flapping). A switch waits `dwell_s` after the one before; each is logged and counted."""

    slo_ttft: float = DEFAULT_SLO_TTFT
    slo_tpot: float = DEFAULT_SLO_TPOT
    window_s: float = 30.0
    dwell_s: float = 20.0
    min_samples: int = 8
    miss_share: float = 0.1
    """Requests missing an SLO, of those judged, that calls for trying the other mode."""
    max_prefill_busy: float = 0.7
    """The predicted (aggregated) or measured (split) busy share of the prefill replica beyond which it is not one."""
    memory_s: float = 300.0
    margin: float = 0.05
    interval_s: float = 2.0
    split: bool = False
    switched_at: float = field(default_factory=time.monotonic)
    switches: Counter[str] = field(default_factory=Counter)
    """to split, to aggregated."""
    left: dict[bool, tuple[float, float]] = field(default_factory=dict)
    """split? -> (when the mode was left, its goodput then)."""
    finished: deque[tuple[float, bool, bool]] = field(default_factory=lambda: deque(maxlen=4096))
    """(when, missed TTFT, missed TPOT) of finished requests."""
    _last: tuple[float, int, dict[int, float]] | None = None
    """The last look: when, prompt tokens computed by then, each replica's busy seconds."""

    async def run(self, replicas: list[Replica]) -> None:
        """Look every `interval_s` (the router's task)."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                self.look(replicas)
            except Exception:  # noqa: BLE001 - the loop must outlive one failed look
                log.exception("role switch")

    def look(self, replicas: list[Replica], now: float | None = None) -> str | None:
        """Measure the prompt load (and, split, the prefill replica's busy share) since the last look and switch
        the replicas' roles when `decide` says so; returns the switch made."""
        now = time.monotonic() if now is None else now
        live = [r for r in replicas if r.live and r.client.stats is not None]
        stats = {r.index: r.client.stats for r in live if r.client.stats is not None}
        prompt = sum(s.scheduler.prompt_tokens_computed for s in stats.values())
        busy = {i: s.cost.busy_seconds for i, s in stats.items()}
        last, self._last = self._last, (now, prompt, busy)
        if last is None or len(live) < 2 or now <= last[0]:
            return None
        elapsed = now - last[0]
        prefill = [r for r in live if r.role == "prefill"]
        if prefill:
            p = prefill[0].index
            prefill_busy = max(0.0, busy[p] - last[2].get(p, busy[p])) / elapsed
        else:
            per_token = sum(r.cost.per_token for r in live) / len(live)
            prefill_busy = max(0, prompt - last[1]) / elapsed * per_token
        to = self.decide(prefill_busy, now)
        if to == "split":
            pick = min(live, key=lambda r: (len(r.running), sum(r.waiting_prefill.values()), r.index))
            pick.role = "prefill"
        elif to == "aggregated":
            for r in replicas:
                if r.role == "prefill":
                    r.role = "both"
        if to is not None:
            self.switched(to, now)
            log.info("disaggregation auto: %s (prefill busy %.2f)", to, prefill_busy)
        return to

    def observe(self, ttft: float, tpot: float | None, now: float | None = None) -> None:
        """A request finished with this TTFT and mean TPOT (None: one token)."""
        now = time.monotonic() if now is None else now
        self.finished.append((now, ttft > self.slo_ttft, tpot is not None and tpot > self.slo_tpot))

    def decide(self, prefill_busy: float, now: float | None = None) -> str | None:
        """`split`, `aggregated` or None (stay). `prefill_busy`: the share of time one replica would spend on (or,
        split, spends on) the prompts."""
        now = time.monotonic() if now is None else now
        if now - self.switched_at < self.dwell_s:
            return None
        since = max(now - self.window_s, self.switched_at)
        recent = [(ttft, tpot) for t, ttft, tpot in self.finished if t >= since]
        if len(recent) < self.min_samples:
            return None
        ttft_miss = sum(r[0] for r in recent) / len(recent)
        tpot_miss = sum(r[1] for r in recent) / len(recent)
        goodput = sum(not (a or b) for a, b in recent) / len(recent)
        other = "aggregated" if self.split else "split"
        remembered = self.left.get(not self.split)
        if remembered is not None and now - remembered[0] < self.memory_s:
            return other if remembered[1] > goodput + self.margin else None
        if not self.split and tpot_miss >= self.miss_share and tpot_miss > ttft_miss:
            return other if prefill_busy < self.max_prefill_busy else None
        if self.split and (
            (ttft_miss >= self.miss_share and ttft_miss > tpot_miss) or prefill_busy > (1 + self.max_prefill_busy) / 2
        ):
            return other
        return None

    def switched(self, to: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        since = max(now - self.window_s, self.switched_at)
        recent = [not (a or b) for t, a, b in self.finished if t >= since]
        if recent:
            self.left[self.split] = (now, sum(recent) / len(recent))
        self.split = to == "split"
        self.switched_at = now
        self.switches[to] += 1
