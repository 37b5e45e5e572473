"""Routing policies: which replica serves a request. One small interface, chosen by name (`--router`).

- round-robin: in turn.
- least-load: the replica with the fewest sequences in flight (then the least prefill work waiting).
- prefix (approximate, as SGLang's router): the replica this router sent the longest run of the prompt's leading
  blocks to before, unless that replica is busier than the least-loaded one by more than a margin.
- kv (exact, the default): the replica whose KV cache, as its own KV events tell, holds the most of the prompt,
  weighed against the work already waiting there. Among the replicas not far busier than the least busy one, each
  one's predicted time to first token = a step's fixed time + (its queued prefill tokens + this prompt's uncached
  tokens) / its prefill rate (both fitted from its own step stats) + its decode load, plus the prefill time of the
  cached blocks it would give up (held twice and split from the session's next turn); the lowest wins. With SLOs
  (TTFT; TPOT, predicted as its decode step with this sequence added), the cheapest replica ($/hour) predicted to
  meet them wins; without, where no replica holds any of the prompt, the least loaded wins. Work the router has
  sent and a replica has not yet started counts as queued, and the load bound keeps a burst sharing one prompt from
  herding onto the replica that holds it. Ties go to the least loaded, then at random.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(slots=True)
class ReplicaLoad:
    """What a policy sees of one replica for one decision."""

    index: int
    running: int
    """Sequences the router has in flight there."""
    queued_prefill: int
    """Prompt tokens (uncached, as predicted) of sequences sent there that have not produced a token yet."""
    cached_blocks: int = 0
    """Leading blocks of this prompt the replica holds (kv policy: from its events; prefix: from what was sent)."""
    prefill_tokens_per_s: float = 2000.0
    decode_seconds_per_seq: float = 0.002
    """Step time one more running sequence adds (fitted; what this request waits per token behind the others)."""
    step_seconds: float = 0.0
    """A step's fixed time (fitted), paid once by the step that computes this prompt."""
    usd_per_hour: float = 0.0


@dataclass(frozen=True, slots=True)
class Decision:
    replica: int
    reason: str
    predicted_ttft: float | None = None


class RoutingPolicy(ABC):
    name: str
    uses_kv_index = False

    @abstractmethod
    def choose(self, blocks: list[int], prompt_tokens: int, block_size: int, loads: list[ReplicaLoad]) -> Decision:
        """Pick a replica for a prompt (`blocks`: its full blocks' hashes) among `loads` (the live replicas)."""

    def sent(self, replica: int, blocks: list[int]) -> None:  # noqa: B027 - only policies with memory need it
        """The request went to `replica` (policies that remember what they sent)."""


def least_loaded(loads: list[ReplicaLoad], rng: random.Random) -> ReplicaLoad:
    best = min((r.running, r.queued_prefill) for r in loads)
    return rng.choice([r for r in loads if (r.running, r.queued_prefill) == best])


class RoundRobin(RoutingPolicy):
    name = "round-robin"

    def __init__(self, rng: random.Random) -> None:
        self._next = 0

    def choose(self, blocks: list[int], prompt_tokens: int, block_size: int, loads: list[ReplicaLoad]) -> Decision:
        pick = loads[self._next % len(loads)]
        self._next += 1
        return Decision(pick.index, "turn")


class LeastLoad(RoutingPolicy):
    name = "least-load"

    def __init__(self, rng: random.Random) -> None:
        self._rng = rng

    def choose(self, blocks: list[int], prompt_tokens: int, block_size: int, loads: list[ReplicaLoad]) -> Decision:
        return Decision(least_loaded(loads, self._rng).index, "load")


class Prefix(RoutingPolicy):
    """Remembers the blocks it sent to each replica (up to `capacity` per replica, least recently sent first out)."""

    name = "prefix"
    MARGIN = 4
    """Sequences more than the least-loaded replica's beyond which a prefix match is not followed."""

    def __init__(self, rng: random.Random, capacity: int = 1 << 16) -> None:
        self._rng = rng
        self._capacity = capacity
        self._sent: dict[int, OrderedDict[int, None]] = {}

    def choose(self, blocks: list[int], prompt_tokens: int, block_size: int, loads: list[ReplicaLoad]) -> Decision:
        for r in loads:
            sent = self._sent.get(r.index, OrderedDict())
            r.cached_blocks = next((i for i, h in enumerate(blocks) if h not in sent), len(blocks))
        least = least_loaded(loads, self._rng)
        best = max(r.cached_blocks for r in loads)
        if best == 0:
            return Decision(least.index, "no match: load")
        matched = [r for r in loads if r.cached_blocks == best and r.running <= least.running + self.MARGIN]
        if not matched:
            return Decision(least.index, "match too busy: load")
        return Decision(least_loaded(matched, self._rng).index, "prefix match")

    def sent(self, replica: int, blocks: list[int]) -> None:
        sent = self._sent.setdefault(replica, OrderedDict())
        for h in blocks:
            sent[h] = None
            sent.move_to_end(h)
        while len(sent) > self._capacity:
            sent.popitem(last=False)


class KvAware(RoutingPolicy):
    name = "kv"
    uses_kv_index = True

    def __init__(self, rng: random.Random, slo_ttft: float | None = None, slo_tpot: float | None = None) -> None:
        self._rng = rng
        self.slo_ttft = slo_ttft
        self.slo_tpot = slo_tpot

    def choose(self, blocks: list[int], prompt_tokens: int, block_size: int, loads: list[ReplicaLoad]) -> Decision:
        def ttft(r: ReplicaLoad) -> float:
            uncached = max(prompt_tokens - r.cached_blocks * block_size, 1)
            return (
                r.step_seconds
                + (r.queued_prefill + uncached) / r.prefill_tokens_per_s
                + r.running * r.decode_seconds_per_seq
            )

        def tpot(r: ReplicaLoad) -> float:
            """Its decode step once this sequence joins the ones running there."""
            return r.step_seconds + (r.running + 1) * r.decode_seconds_per_seq

        predicted = {r.index: ttft(r) for r in loads}
        # A replica running far more than the least busy one is not a candidate, whatever it has cached: the
        # cache credit alone would pile a burst sharing one prompt onto one replica and leave the others idle.
        least = min(r.running for r in loads)
        candidates = [r for r in loads if r.running <= max(least * BALANCE_REL, least + BALANCE_ABS)]
        reason = "fastest"
        slo = self.slo_ttft is not None or self.slo_tpot is not None
        if not any(r.cached_blocks for r in candidates) and not slo:
            # Nothing to reuse anywhere: the predictions differ only by load, which least-load weighs directly
            # (running sequences slow every later token, which a TTFT prediction does not see).
            pick = least_loaded(candidates, self._rng)
            return Decision(pick.index, "no cached prefix: load", predicted[pick.index])
        if slo:
            meeting = [
                r
                for r in candidates
                if (self.slo_ttft is None or predicted[r.index] <= self.slo_ttft)
                and (self.slo_tpot is None or tpot(r) <= self.slo_tpot)
            ]
            if meeting:
                cheapest = min(r.usd_per_hour for r in meeting)
                candidates, reason = [r for r in meeting if r.usd_per_hour == cheapest], "cheapest within the SLO"
            else:
                reason = "fastest (none meets the SLO)"
        # Leaving the replica that holds the longest prefix also costs later: that prefix is recomputed and held
        # twice, and the session's next turn finds it split. Each block given up counts once more, beyond TTFT.
        most = max(r.cached_blocks for r in candidates)
        cost = {
            r.index: predicted[r.index] + (most - r.cached_blocks) * block_size / r.prefill_tokens_per_s
            for r in candidates
        }
        best = min(cost.values())
        tied = [r for r in candidates if cost[r.index] <= best * 1.0001]
        pick = least_loaded(tied, self._rng)
        if pick.cached_blocks:
            reason += f", {pick.cached_blocks} blocks cached"
        return Decision(pick.index, reason, predicted[pick.index])


BALANCE_REL, BALANCE_ABS = 2.0, 8
"""The kv policy considers only replicas running at most max(2 x, 8 more than) the least busy one's sequences."""

POLICIES: dict[str, type[RoutingPolicy]] = {p.name: p for p in (KvAware, RoundRobin, LeastLoad, Prefix)}


def make_policy(
    name: str, seed: int = 0, slo_ttft: float | None = None, slo_tpot: float | None = None
) -> RoutingPolicy:
    if name not in POLICIES:
        raise ValueError(f"unknown router policy {name!r}: expected one of {', '.join(POLICIES)}")
    rng = random.Random(seed)
    return KvAware(rng, slo_ttft, slo_tpot) if name == "kv" else POLICIES[name](rng)  # type: ignore[call-arg]


def parse_replica_prices(prices: Sequence[str], n: int) -> dict[int, float | str]:
    """`ID=USD_PER_HOUR` or `ID=PROFILE` specs as {replica: dollars per hour or profile name}."""
    out: dict[int, float | str] = {}
    for spec in prices:
        index, sep, value = spec.partition("=")
        index, value = index.strip(), value.strip()
        if not sep or not index.isdigit() or not value:
            raise ValueError(f"replica price {spec!r}: expected ID=USD_PER_HOUR or ID=PROFILE")
        i = int(index)
        if i >= n:
            raise ValueError(f"replica price {spec!r}: there are {n} replicas (ids 0..{n - 1})")
        if i in out:
            raise ValueError(f"replica price {spec!r}: replica {i} is priced twice")
        try:
            usd = float(value)
        except ValueError:
            out[i] = value
            continue
        if not 0 <= usd < float("inf"):
            raise ValueError(f"replica price {spec!r}: dollars per hour must be finite and >= 0")
        out[i] = usd
    return out
