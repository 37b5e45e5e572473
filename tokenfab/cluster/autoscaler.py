"""Autoscaler: how many replicas the load needs to stay within the SLO, decided from live step stats (load mode).

Every `interval_s` it looks at the replicas: the sequences they run and the prefill work queued on them (summed over
the replicas and moving-averaged: over `smooth_up_s` to scale up, the longer `smooth_down_s` to scale down), and
each warm replica's fitted step cost (a step's fixed time, the time one more sequence adds, the prefill rate: what
the kv router already fits). Spread evenly over k replicas, that load predicts

    TPOT(k) = step + (running / k) x per-sequence time
    TTFT(k) = step + (queued prefill / k) / prefill rate + (running / k) x per-sequence time

Where it is given the fleet's `Traffic`, "running" is also forecast from the arrivals (throughput mode, by Little's
law): at an arrival rate lambda (moving-averaged over `smooth_up_s`) of requests with P uncached prompt tokens and L
output tokens (their recent means), the prompts take a share u = lambda P / prefill rate / k of each replica's time,
which stretches every decode step by 1 / (1 - u); a request stays P / prefill rate + L x TPOT(k), so the sequences
running settle at s = lambda (P / prefill rate + L step / (1 - u)) / (1 - lambda L per-sequence time / (k (1 - u)))
— without bound once the arrivals outgrow what k replicas can compute. The predictions take the larger of the
running count seen and this forecast, and TPOT the stretch: a surge shows as soon as its arrivals do, not only once
the sequences it started have piled up.

- **Up** when TTFT or TPOT over the replicas running and starting reaches `up_at` of its SLO in `up_after`
  consecutive looks: before the SLO breaks, not after, and a replica already starting counts as capacity (a second
  start only if the load outgrows it too).
- **Down** only when the survivors can absorb the load: with one replica fewer both predictions stay under
  `down_at` of the SLO, continuously for `down_after_s`, none starting, and no change for as long. The replica
  running the fewest sequences is drained (its sequences move, or finish there with migration off).
- **Cold starts are ignored**: a replica's fitted costs count only once it has been up `warmup_s` (its first steps
  are slow and its fit starts from defaults); with no warm replica nothing is decided.

The gap between `up_at` of the SLO over k replicas and `down_at` of it over k - 1 is the hysteresis that keeps a
steady load from scaling 2 -> 1 -> 2. The same object decides in the router and in the simulator.
"""

from __future__ import annotations

import asyncio
import logging
import math
import statistics
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tokenfab.cluster.policies import ReplicaLoad

log = logging.getLogger("tokenfab.cluster")


@dataclass(frozen=True, slots=True)
class AutoscaleOptions:
    min_replicas: int = 1
    max_replicas: int = 4
    slo_ttft: float = 2.0
    slo_tpot: float = 0.1
    interval_s: float = 2.0
    up_at: float = 0.8
    """Scale up when a prediction reaches this share of its SLO."""
    up_after: int = 2
    """Consecutive looks over `up_at` before scaling up."""
    down_at: float = 0.5
    """Scale down when, on one replica fewer, both predictions stay under this share of their SLO..."""
    down_after_s: float = 30.0
    """...for this long (and this long after the last change)."""
    warmup_s: float = 10.0
    """A replica's fitted step costs are trusted once it has been up this long."""
    smooth_up_s: float = 4.0
    """Time constant of the moving average the load is read through for scaling up (a surge shows within seconds)..."""
    smooth_down_s: float = 15.0
    """...and for scaling down (a lull between bursts of a steady load is not a trend)."""
    forecast: bool = True
    """Also forecast the sequences running from the arrivals, where the caller keeps them (see `Traffic`)."""

    def __post_init__(self) -> None:
        checks = [
            (1 <= self.min_replicas <= self.max_replicas, "need 1 <= min_replicas <= max_replicas"),
            (self.slo_ttft > 0 and self.slo_tpot > 0, "the autoscaler needs SLOs > 0"),
            (self.interval_s > 0 and self.up_after >= 1, "interval_s must be > 0 and up_after >= 1"),
            (0 < self.down_at < self.up_at <= 1, "need 0 < down_at < up_at <= 1"),
            (
                min(self.down_after_s, self.warmup_s, self.smooth_up_s, self.smooth_down_s) >= 0,
                "down_after_s, warmup_s and the smoothing times must be >= 0",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


@dataclass(slots=True)
class Traffic:
    """The fleet's requests as the autoscaler forecasts from them: how many arrived, and the recent means of their
    uncached prompt tokens and of the tokens they were given (an exponential average over about `SPAN` requests)."""

    SPAN = 32

    arrived: int = 0
    prompt_tokens: float | None = None
    output_tokens: float | None = None

    def arrive(self, prompt_tokens: int, n: int = 1) -> None:
        """`n` requests (the siblings of one prompt: one prefill) arrived."""
        self.arrived += n
        self.prompt_tokens = _mean(self.prompt_tokens, prompt_tokens / n)

    def finish(self, output_tokens: int) -> None:
        self.output_tokens = _mean(self.output_tokens, output_tokens)


def _mean(average: float | None, x: float) -> float:
    return float(x) if average is None else average + (x - average) / Traffic.SPAN


@dataclass(frozen=True, slots=True)
class ReplicaView:
    """One replica as the autoscaler sees it."""

    load: ReplicaLoad
    up_s: float
    """Seconds since it joined (0 while starting)."""
    starting: bool = False


@dataclass(frozen=True, slots=True)
class ScaleDecision:
    action: str
    """up | down | hold"""
    reason: str
    replica: int | None = None
    """The replica to drain (down)."""
    ttft: float | None = None
    """Predicted over the replicas there are (running and starting)."""
    tpot: float | None = None


class Autoscaler:
    def __init__(self, options: AutoscaleOptions) -> None:
        self.options = options
        self._over = 0
        self._fits_since: float | None = None
        self._changed = float("-inf")
        self._seen: dict[float, tuple[float, float, float]] = {}
        """Per time constant: (when, sequences, queued prefill tokens), the fleet's load moving-averaged."""
        self._arrivals: tuple[float, int, float | None] | None = None
        """(when, requests arrived by then, arrival rate moving-averaged over smooth_up_s)."""

    def decide(self, now: float, replicas: list[ReplicaView], traffic: Traffic | None = None) -> ScaleDecision:
        """`traffic`: the fleet's arrivals, to forecast the sequences they will keep running (none: the load seen)."""
        o = self.options
        running = [v for v in replicas if not v.starting]
        starting = len(replicas) - len(running)
        if len(replicas) < o.min_replicas:
            return self._act(now, ScaleDecision("up", "below the minimum"))
        warm = [v.load for v in running if v.up_s >= o.warmup_s]
        if not warm:
            self._over, self._fits_since = 0, None
            return ScaleDecision("hold", "no warm replica to predict from")
        step = statistics.fmean(w.step_seconds for w in warm)
        per_seq = statistics.fmean(w.decode_seconds_per_seq for w in warm)
        rate = statistics.fmean(w.prefill_tokens_per_s for w in warm)
        seqs = sum(v.load.running for v in running)
        queued = sum(v.load.queued_prefill for v in running)
        fast = self._smoothed(o.smooth_up_s, now, seqs, queued)
        slow = self._smoothed(o.smooth_down_s, now, seqs, queued)
        arrival_rate = self._arrival_rate(now, traffic) if o.forecast else None

        def prefill_share(k: int) -> float:
            """The share of each of k replicas' time the arrivals' prompts take (0 without a forecast)."""
            if traffic is None or arrival_rate is None:
                return 0.0
            return arrival_rate * (traffic.prompt_tokens or 0.0) / rate / k

        def settled(k: int) -> float:
            """The sequences the arrivals keep running on k replicas (Little's law; 0 without a forecast)."""
            if traffic is None or arrival_rate is None or traffic.output_tokens is None:
                return 0.0
            prompt, out, share = traffic.prompt_tokens or 0.0, traffic.output_tokens, prefill_share(k)
            busy = arrival_rate * out * per_seq / k / (1 - share) if share < 1 else math.inf
            if busy >= 1:
                return math.inf
            return arrival_rate * (prompt / rate + out * step / (1 - share)) / (1 - busy)

        def predict(k: int, load: tuple[float, float]) -> tuple[float, float]:
            """TTFT and TPOT over k replicas; a decode step is stretched by the prompts computed between steps."""
            seqs, queued, share = max(load[0], settled(k)), load[1], prefill_share(k)
            tpot = (step + seqs / k * per_seq) / (1 - share) if share < 1 else math.inf
            return step + queued / k / rate + seqs / k * per_seq, tpot

        ttft, tpot = predict(len(replicas), fast)
        if ttft >= o.up_at * o.slo_ttft or tpot >= o.up_at * o.slo_tpot:
            self._over += 1
            self._fits_since = None
            if len(replicas) >= o.max_replicas:
                return ScaleDecision("hold", "at the maximum", None, ttft, tpot)
            if self._over < o.up_after:
                return ScaleDecision("hold", "over the SLO share once", None, ttft, tpot)
            which = "ttft" if ttft >= o.up_at * o.slo_ttft else "tpot"
            why = "arrivals forecast" if settled(len(replicas)) > fast[0] else "predicted"
            return self._act(now, ScaleDecision("up", f"{why} {which} near the SLO", None, ttft, tpot))
        self._over = 0
        if starting or len(running) <= o.min_replicas:
            self._fits_since = None
            return ScaleDecision("hold", "within the SLO", None, ttft, tpot)
        fewer_ttft, fewer_tpot = predict(len(running) - 1, slow)
        if fewer_ttft > o.down_at * o.slo_ttft or fewer_tpot > o.down_at * o.slo_tpot:
            self._fits_since = None
            return ScaleDecision("hold", "within the SLO; one fewer would not be", None, ttft, tpot)
        if self._fits_since is None:
            self._fits_since = now
        if now - self._fits_since < o.down_after_s or now - self._changed < o.down_after_s:
            return ScaleDecision("hold", "one fewer would do: waiting", None, ttft, tpot)
        idle = min(running, key=lambda v: (v.load.running, v.load.queued_prefill, v.up_s))
        return self._act(now, ScaleDecision("down", "the others absorb the load", idle.load.index, ttft, tpot))

    def _smoothed(self, tau: float, now: float, seqs: int, queued: int) -> tuple[float, float]:
        """The fleet's sequences and queued prefill through an exponential moving average of time constant tau."""
        seen = self._seen.get(tau)
        if seen is None or tau == 0:
            seen = (now, float(seqs), float(queued))
        else:
            at, s, q = seen
            keep = math.exp(-(now - at) / tau)
            seen = (now, s * keep + seqs * (1 - keep), q * keep + queued * (1 - keep))
        self._seen[tau] = seen
        return seen[1], seen[2]

    def _arrival_rate(self, now: float, traffic: Traffic | None) -> float | None:
        """Requests per second arriving, moving-averaged over smooth_up_s (None before two looks)."""
        if traffic is None:
            return None
        if self._arrivals is None:
            self._arrivals = (now, traffic.arrived, None)
            return None
        at, arrived, average = self._arrivals
        if now <= at:
            return average
        rate = (traffic.arrived - arrived) / (now - at)
        tau = self.options.smooth_up_s
        keep = math.exp(-(now - at) / tau) if tau > 0 else 0.0
        average = rate if average is None else average * keep + rate * (1 - keep)
        self._arrivals = (now, traffic.arrived, average)
        return average

    def _act(self, now: float, decision: ScaleDecision) -> ScaleDecision:
        self._over, self._fits_since, self._changed = 0, None, now
        return decision


class ScalingLoop:
    """An Autoscaler at work on a replica pool: it looks every `interval_s` (`look`: the replicas running and
    starting), starts one (`up`: the index started, None if none could be) or drains one (`down`), and keeps what
    it decided for /replicas and the metrics."""

    def __init__(
        self,
        options: AutoscaleOptions,
        look: Callable[[float], list[ReplicaView]],
        up: Callable[[], Awaitable[int | None]],
        down: Callable[[int], None],
        traffic: Traffic | None = None,
    ) -> None:
        self.options = options
        self.autoscaler = Autoscaler(options)
        self._look, self._up, self._down = look, up, down
        self.traffic = traffic
        """The fleet's arrivals, kept by the caller, for the autoscaler's forecast."""
        self.decisions: Counter[tuple[str, str]] = Counter()
        """Decisions that changed something, by (action, reason)."""
        self.last: ScaleDecision | None = None

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.options.interval_s)
            try:
                await self.step(time.monotonic())
            except Exception:  # noqa: BLE001 - the autoscaler must outlive one failed round
                log.exception("autoscaler")

    async def step(self, now: float) -> None:
        decision = self.last = self.autoscaler.decide(now, self._look(now), self.traffic)
        if decision.action == "up":
            which = await self._up()
        elif decision.action == "down" and decision.replica is not None:
            which = decision.replica
            self._down(which)
        else:
            return
        if which is None:
            return
        self.decisions[(decision.action, decision.reason)] += 1
        log.info(
            "autoscaler: %s (replica %d): %s; predicted TTFT %.3f s, TPOT %.3f s",
            decision.action, which, decision.reason, decision.ttft or 0.0, decision.tpot or 0.0,
        )  # fmt: skip

    def state(self) -> dict:
        """Its bounds, its last look and what it decided."""
        o, d = self.options, self.last
        return {
            "min_replicas": o.min_replicas,
            "max_replicas": o.max_replicas,
            "slo_ttft": o.slo_ttft,
            "slo_tpot": o.slo_tpot,
            "last": None if d is None else {"action": d.action, "reason": d.reason, "ttft": d.ttft, "tpot": d.tpot},
            "decisions": [{"action": a, "reason": why, "count": n} for (a, why), n in self.decisions.items()],
        }
