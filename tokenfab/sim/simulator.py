"""Simulator: replicas running the real Scheduler and KVCacheManager (prefix caching included) in virtual time, a
routing policy of the real router in front of them, and the model replaced by a fitted `StepCostModel`.

A replica steps back to back while it has work: each step is planned by its scheduler, lasts what the cost model
predicts for that plan, and then applies one sampled token per sampling sequence through the scheduler's own update
(requests run to their output length, as the benchmarks' requests do with ignore_eos). Requests come from the same
workloads as `tokenfab bench serve` (prompts tokenized as the server would), in a closed loop (concurrency, agentic
sessions with think time) or an open loop (rate, gamma inter-arrival times), and every request becomes the same
`RequestRecord` a measured run writes, so `tokenfab.bench.stats.summarize` reports both alike. Front-end time
(HTTP, tokenizing, detokenizing) is not simulated.
"""

from __future__ import annotations

import functools
import heapq
import itertools
import random
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenfab.bench.records import RequestRecord
from tokenfab.cluster.autoscaler import Autoscaler, ReplicaView, ScaleDecision, Traffic
from tokenfab.cluster.policies import ReplicaLoad, RoutingPolicy
from tokenfab.engine.block_hash import BlockHash, block_hashes, external_hash
from tokenfab.engine.kv_cache_manager import KVCacheManager
from tokenfab.engine.scheduler import Scheduler
from tokenfab.engine.types import Request, SampleResult, SamplingParams, StepPlan
from tokenfab.sim.step_cost import StepCostModel, StepFeatures


@dataclass(frozen=True, slots=True)
class ReplicaShape:
    """What a simulated replica is: its KV pools and scheduler limits (as the real engine would size them)."""

    windows: list[int | None]
    blocks_per_group: list[int]
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 512
    max_model_len: int = 4096
    usd_per_hour: float = 0.09


@dataclass(slots=True)
class SimRequest:
    request_id: str
    prompt: list[int]
    max_tokens: int
    record: RequestRecord
    on_finish: Callable[[SimRequest], None] | None = None
    request: Request | None = None
    uncached: int = 0
    recorded: bool = True
    """False for a warm-up request (sent, not reported)."""


@dataclass(slots=True)
class SimReplica:
    index: int
    shape: ReplicaShape
    cost: StepCostModel
    kv: KVCacheManager = field(init=False)
    scheduler: Scheduler = field(init=False)
    busy: bool = False
    plan: StepPlan | None = None
    flights: dict[str, SimRequest] = field(default_factory=dict)
    steps: list[tuple[float, StepPlan]] = field(default_factory=list)
    """(start time, plan) of every step taken, when recorded."""
    record_steps: bool = False
    state: str = "running"
    """starting | running | draining (takes no new work, finishes its own) | stopped."""
    joined: float = 0.0
    """When it last started running."""
    alive_since: float | None = 0.0
    """When it last started (it is paid for from then until it stops); None while stopped."""
    alive_s: float = 0.0
    """Seconds it was paid for in its earlier lives."""

    def __post_init__(self) -> None:
        s = self.shape
        self.kv = KVCacheManager(list(s.windows), list(s.blocks_per_group), s.block_size)
        self.scheduler = Scheduler(self.kv, s.max_num_seqs, s.max_num_batched_tokens, s.max_model_len)

    def load(self) -> ReplicaLoad:
        c = self.cost.coef
        per_token = c["prefill_tokens"] or 1e-4
        # What one more decoding sequence adds to a step: its own cost and the KV it reads (a context like theirs).
        context = sum(len(f.prompt) for f in self.flights.values()) / len(self.flights) if self.flights else 0
        return ReplicaLoad(
            self.index,
            len(self.flights),
            sum(f.uncached for f in self.flights.values() if not f.record.token_times),
            prefill_tokens_per_s=1 / per_token,
            decode_seconds_per_seq=c["decode_seqs"] + c["decode_context"] * context,
            step_seconds=c["overhead"],
            usd_per_hour=self.shape.usd_per_hour,
        )

    def cached_blocks(self, prompt: list[int], hashes: list[BlockHash]) -> int:
        """Leading blocks of the prompt (`hashes`: its chain) this replica's full-attention pools hold (what its KV
        events tell)."""
        bs = self.shape.block_size
        full = [p for p, w in zip(self.kv.pools, self.kv.windows) if w is None] or self.kv.pools
        for n, h in enumerate(hashes):
            key = (hashes[n - 1] if n else None, tuple(prompt[n * bs : (n + 1) * bs]))
            if not all(p.lookup(h, key) is not None for p in full):
                return n
        return len(hashes)


class Simulator:
    """Replicas in virtual time; `submit` requests (at a time), `run` until everything finished."""

    def __init__(
        self, shape: ReplicaShape, cost: StepCostModel, replicas: int = 1, policy: RoutingPolicy | None = None
    ) -> None:
        if replicas > 1 and policy is None:
            raise ValueError("several replicas need a routing policy")
        self.replicas = [SimReplica(i, shape, cost) for i in range(replicas)]
        self.shape, self.cost = shape, cost
        self.policy = policy
        self.now = 0.0
        self._events: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._submitted = itertools.count()
        self.records: list[RequestRecord] = []
        self.traffic = Traffic()
        """Requests arrived and their sizes, as the router keeps them (for an autoscaler's forecast)."""

    # -- events ----------------------------------------------------------------------------------------------------

    def at(self, t: float, action: Callable[[], None]) -> None:
        heapq.heappush(self._events, (max(t, self.now), next(self._order), action))

    def run(self, until: float | None = None) -> None:
        while self._events:
            t, _, action = heapq.heappop(self._events)
            if until is not None and t > until:
                heapq.heappush(self._events, (t, next(self._order), action))
                return
            self.now = t
            action()

    # -- requests --------------------------------------------------------------------------------------------------

    def submit(self, req: SimRequest) -> None:
        """Send a request now: it reaches a replica after the front end's measured latency (longer while a replica
        is stepping: the front end shares the machine with it)."""
        req.record.start = self.now
        cost = self.replicas[0].cost
        latency = cost.request_latency_s
        if cost.busy_request_latency_s is not None and any(r.busy for r in self.replicas):
            latency = cost.busy_request_latency_s
        if latency > 0:
            self.at(self.now + latency, lambda: self._arrive(req))
        else:
            self._arrive(req)

    def _arrive(self, req: SimRequest) -> None:
        """Route and queue a request now."""
        bs = self.replicas[0].shape.block_size
        hashes = block_hashes(req.prompt, bs)  # once per request, for routing and the uncached count alike
        blocks = [external_hash(h) for h in hashes]
        replica = self._route(req.prompt, hashes, blocks)
        req.uncached = max(len(req.prompt) - replica.cached_blocks(req.prompt, hashes) * bs, 1)
        self.traffic.arrive(req.uncached)
        params = SamplingParams(max_tokens=req.max_tokens, temperature=0.0, ignore_eos=True)
        # Arrival order breaks ties in the scheduler's queue (a preempted request goes back ahead of later ones):
        # requests submitted at one virtual instant keep the order they were submitted in, as in a real engine.
        req.request = Request(req.request_id, list(req.prompt), params, self.now + next(self._submitted) * 1e-12)
        replica.flights[req.request_id] = req
        replica.scheduler.add(req.request)
        if self.policy is not None:
            self.policy.sent(replica.index, blocks)
        self._wake(replica)

    def _route(self, prompt: list[int], hashes: list[BlockHash], blocks: list[int]) -> SimReplica:
        running = [r for r in self.replicas if r.state == "running"]
        if len(running) == 1 or self.policy is None:
            return running[0]
        loads = [r.load() for r in running]
        if self.policy.uses_kv_index:
            for load, r in zip(loads, running):
                load.cached_blocks = r.cached_blocks(prompt, hashes)
        bs = self.replicas[0].shape.block_size
        decision = self.policy.choose(blocks, len(prompt), bs, loads)
        return self.replicas[decision.replica]

    # -- scaling ---------------------------------------------------------------------------------------------------

    def start_replica(self, cold_start_s: float = 0.0) -> SimReplica:
        """A replica more (a stopped one again, with an empty cache, or a new one): paid for from now, taking work
        once its cold start is over."""
        stopped = [r for r in self.replicas if r.state == "stopped"]
        if stopped:
            r = stopped[0]
            r.kv = KVCacheManager(list(r.shape.windows), list(r.shape.blocks_per_group), r.shape.block_size)
            r.scheduler = Scheduler(r.kv, r.shape.max_num_seqs, r.shape.max_num_batched_tokens, r.shape.max_model_len)
        else:
            r = SimReplica(len(self.replicas), self.shape, self.cost)
            self.replicas.append(r)
        r.state, r.alive_since = "starting", self.now

        def joined() -> None:
            r.state, r.joined = "running", self.now

        self.at(self.now + cold_start_s, joined)
        return r

    def drain_replica(self, index: int) -> None:
        """Stop sending the replica work; it stops once its sequences have finished."""
        r = self.replicas[index]
        if r.state != "running" or sum(x.state == "running" for x in self.replicas) < 2:
            raise ValueError(f"replica {index} cannot be drained ({r.state})")
        r.state = "draining"
        self._stop_if_drained(r)

    def _stop_if_drained(self, r: SimReplica) -> None:
        if r.state == "draining" and not r.flights and r.alive_since is not None:
            r.state = "stopped"
            r.alive_s += self.now - r.alive_since
            r.alive_since = None

    def replica_seconds(self) -> float:
        """Replica time paid for so far (starting, running and draining)."""
        return sum(r.alive_s + (self.now - r.alive_since if r.alive_since is not None else 0.0) for r in self.replicas)

    @property
    def busy(self) -> bool:
        """Anything still to happen besides periodic looks: events pending or sequences in flight."""
        return bool(self._events) or any(r.flights for r in self.replicas)

    # -- stepping --------------------------------------------------------------------------------------------------

    def _wake(self, replica: SimReplica) -> None:
        if not replica.busy and replica.scheduler.has_unfinished():
            replica.busy = True
            self.at(self.now, lambda: self._step(replica))

    def _step(self, replica: SimReplica) -> None:
        plan = replica.scheduler.schedule()
        if plan.empty:
            replica.busy = False
            return
        if replica.record_steps:
            replica.steps.append((self.now, plan))
        seconds = replica.cost.predict(StepFeatures.of(plan))
        self.at(self.now + seconds, lambda: self._finish(replica, plan))

    def _finish(self, replica: SimReplica, plan: StepPlan) -> None:
        samplers = [s for s in plan.scheduled if s.samples]
        tokens = [[_token(s.request.request_id, s.request.num_output_tokens)] for s in samplers]
        update = replica.scheduler.update(
            plan, samplers, SampleResult(tokens, [None] * len(samplers), [0] * len(samplers))
        )
        for e in update.emitted:
            req = replica.flights[e.request.request_id]
            rec = req.record
            if e.token_ids:
                rec.token_times.append(self.now)
                rec.chunk_tokens.append(len(e.token_ids))
                rec.output_tokens += len(e.token_ids)
                if rec.cached_tokens is None:
                    rec.cached_tokens = e.request.num_cached_tokens
            if e.status is not None:
                rec.end = self.now
                self.traffic.finish(rec.output_tokens)
                del replica.flights[req.request_id]
                if req.recorded:
                    self.records.append(rec)
                if req.on_finish is not None:
                    req.on_finish(req)
        replica.busy = False
        self._stop_if_drained(replica)
        self._wake(replica)


def autoscale(sim: Simulator, scaler: Autoscaler, cold_start_s: float = 10.0) -> list[tuple[float, int, ScaleDecision]]:
    """Let `scaler` start and drain the simulator's replicas, looking every `interval_s` while anything is left to
    happen; returns its decisions as (time, replicas paid for after it, decision) as they come."""
    history: list[tuple[float, int, ScaleDecision]] = []

    def look() -> None:
        views = [
            ReplicaView(r.load(), sim.now - r.joined if r.state == "running" else 0.0, r.state == "starting")
            for r in sim.replicas
            if r.state in ("running", "starting")
        ]
        decision = scaler.decide(sim.now, views, sim.traffic)
        if decision.action == "up":
            sim.start_replica(cold_start_s)
        elif decision.action == "down" and decision.replica is not None:
            sim.drain_replica(decision.replica)
        history.append((sim.now, sum(r.state in ("running", "starting") for r in sim.replicas), decision))
        if sim.busy:
            sim.at(sim.now + scaler.options.interval_s, look)

    sim.at(sim.now, look)
    return history


def _token(request_id: str, n: int) -> int:
    """A deterministic sampled token, the same in every run (never one of a vocabulary's first, control ids)."""
    return 1000 + zlib.crc32(f"{request_id}/{n}".encode()) % 20000


# -- load generation ---------------------------------------------------------------------------------------------


def closed_loop(sim: Simulator, requests: list[tuple[list[int], int]], concurrency: int, warmup: int = 0) -> None:
    """`concurrency` clients, each sending the next request when its last one finished (the first `warmup`
    requests are not recorded)."""
    queue = list(reversed(list(enumerate(requests))))

    def next_one(_: SimRequest | None = None) -> None:
        if not queue:
            return
        i, (prompt, max_tokens) = queue.pop()
        record = RequestRecord(0.0, 0.0, len(prompt))
        sim.submit(SimRequest(f"r{i}", prompt, max_tokens, record, next_one, recorded=i >= warmup))

    for _ in range(concurrency):
        sim.at(sim.now, next_one)


def open_loop(
    sim: Simulator,
    requests: list[tuple[list[int], int]],
    rate: float,
    burstiness: float,
    seed: int = 0,
    warmup: int = 0,
    arrivals: list[float | None] | None = None,
) -> None:
    """Arrivals at `rate` per second, gamma inter-arrival times of shape `burstiness` (1: Poisson), drawn as the
    bench's load generator draws them (the same seed gives the same times); a request with its own arrival time
    (a trace) keeps it."""
    rng, elapsed = random.Random(seed), 0.0
    for i, (prompt, max_tokens) in enumerate(requests):
        own = arrivals[i] if arrivals is not None else None
        elapsed = own if own is not None else elapsed + rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        req = SimRequest(f"r{i}", prompt, max_tokens, RequestRecord(0.0, 0.0, len(prompt)), recorded=i >= warmup)
        sim.at(sim.now + elapsed, functools.partial(sim.submit, req))


@dataclass(frozen=True, slots=True)
class SessionTokens:
    """An agentic session in tokens: its system prompt, then per turn a tool output and a reply length."""

    session: str
    system: list[int]
    tools: list[list[int]]
    replies: list[int]
    think_time_s: float


def sessions_loop(sim: Simulator, sessions: list[SessionTokens], concurrency: int) -> None:
    """`concurrency` clients, each running whole sessions: a turn's prompt is the conversation so far and a new
    tool output; after the reply, the session thinks, then sends its next turn."""
    queue = list(reversed(sessions))

    def start_session() -> None:
        if queue:
            turn(queue.pop(), 0, [])

    def turn(s: SessionTokens, k: int, conversation: list[int]) -> None:
        if k == len(s.tools):
            start_session()
            return
        prompt = (conversation or list(s.system)) + s.tools[k]

        def finished(req: SimRequest) -> None:
            assert req.request is not None
            after = prompt + list(req.request.output_token_ids)
            sim.at(sim.now + s.think_time_s, lambda: turn(s, k + 1, after))

        record = RequestRecord(0.0, 0.0, len(prompt), session=s.session, turn=k)
        sim.submit(SimRequest(f"{s.session}-t{k}", prompt, s.replies[k], record, finished))

    for _ in range(concurrency):
        sim.at(sim.now, start_session)
