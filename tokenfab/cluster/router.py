"""Router: an EngineClient over several replicas (engine cores), so the front end serves them as one engine.

Each request (its n siblings together) goes to the replica its policy picks (tokenfab.cluster.policies); the
router remembers where every sequence runs, routes its aborts there, and merges the replicas' step results into
one stream whose stats are the replicas' summed. It keeps per replica the prefill work it has sent and not yet
seen start (what a policy counts as queued: the replicas' own stats arrive a step late) and a step-cost fit from
the replica's stats. Replicas publish KV events; the kv policy reads them through a KvIndex.

Nothing accepted is lost when a replica goes: the router keeps each sequence's request and the tokens it has passed
on, and when its replica dies (the process exits), hangs (no step within `hang_timeout` while it has work: it is
killed) or is drained, the sequence continues on another replica from its prompt + those tokens
(`CoreRequest.output_token_ids`: the same max_tokens, penalties, grammar state and seeded random stream), its cost
so far carried over. Outputs a replica sends after its sequences have left it are dropped, so the front end sees one
unbroken stream. A replica that died is restarted with backoff (1 s doubling to 30 s, reset after a minute up) and
rejoins with a fresh KV index, on probation: one sequence at a time until it has finished PROBATION of them. With
migration off, or past `max_migrations`, a lost sequence fails with 503.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Coroutine, Sequence
from typing import Any

import msgspec

from tokenfab.cluster.autoscaler import AutoscaleOptions, ReplicaView, ScalingLoop, Traffic
from tokenfab.cluster.disagg import ROLES, Disaggregation, takes_requests
from tokenfab.cluster.kv_index import KvIndex, prompt_blocks
from tokenfab.cluster.policies import Decision, RoutingPolicy
from tokenfab.cluster.replica import Factory, Flight, PaidTime, Replica, StepCost, plus_cost, sum_stats
from tokenfab.engine.client import EngineClient, EngineDead
from tokenfab.engine.ipc import FromCore, StepResult
from tokenfab.engine.messages import CoreInfo, CoreOutput, CoreRequest
from tokenfab.engine.stats import EngineStats

log = logging.getLogger("tokenfab.cluster")
PLANNED = 4096
PLAN_TTL = 10.0
"""Seconds a placement waits for its request to be added (admitted requests are added at once)."""
RESTART_BACKOFF = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
"""Seconds before restarting a replica after its 1st, 2nd, ... consecutive failure."""
STABLE_SECONDS = 60.0
"""A replica up this long has its failure count reset."""
PROBATION = 2
"""Sequences a restarted replica finishes, one at a time, before it takes its share again."""


class Router(EngineClient):
    def __init__(
        self,
        clients: list[EngineClient],
        policy: RoutingPolicy,
        factories: list[Factory] | None = None,
        migration: bool = True,
        max_migrations: int = 3,
        hang_timeout: float = 60.0,
        autoscale: AutoscaleOptions | None = None,
        roles: Sequence[str] = (),
        disaggregation: Disaggregation | None = None,
        step_prior: tuple[float, float, float] | None = None,
    ) -> None:
        """`roles`: each replica's (both, prefill, decode; default both); with prefill replicas, `disaggregation`
        decides per request whether its prompt is computed on one (tokenfab.cluster.disagg). `step_prior`: the
        (overhead, per_token, per_seq) each replica's step-cost fit starts from (StepCost.measured)."""
        super().__init__()
        if not clients:
            raise ValueError("a router needs at least one replica")
        roles = list(roles) or ["both"] * len(clients)
        if len(roles) != len(clients) or any(r not in ROLES for r in roles):
            raise ValueError(f"roles: one of {', '.join(ROLES)} per replica")
        if not any(takes_requests(r) for r in roles):
            raise ValueError("at least one replica must take requests (role both or decode)")
        factories = factories or [None] * len(clients)  # type: ignore[list-item]
        self.replicas = [
            Replica(i, c, f, role=role, cost=StepCost(*step_prior) if step_prior else StepCost())
            for i, (c, f, role) in enumerate(zip(clients, factories, roles))
        ]
        split = any(r == "prefill" for r in roles)
        self.disagg = disaggregation if split or (disaggregation is not None and disaggregation.roles) else None
        self.policy = policy
        self.migration = migration
        self.max_migrations = max_migrations
        self.hang_timeout = hang_timeout
        self.index = KvIndex()
        self.decisions: Counter[str] = Counter()
        """Decisions by reason."""
        self.ttft_seconds = {"predicted": 0.0, "actual": 0.0}
        """Summed over first tokens: the TTFT the kv policy predicted, and the one that came (router to token)."""
        self.migrations: Counter[str] = Counter()
        """Sequences moved to another replica, by cause (died, hung, drained), and lost ones (lost)."""
        self._predictions: dict[str, float] = {}
        self._flights: dict[str, Flight] = {}
        self._parked: list[Flight] = []
        """Sequences whose replica was lost while no other ran: they continue when one (re)joins."""
        self._planned: OrderedDict[str, tuple[Replica, float, list[int]]] = OrderedDict()
        """Request id -> where `place` decided it runs, when, and its prompt's block hashes (dropped after
        PLAN_TTL: a refused request)."""
        self._results: asyncio.Queue[tuple[Replica | None, StepResult] | EngineDead] = asyncio.Queue()
        self._tasks: dict[str, asyncio.Task] = {}
        self.traffic = Traffic()
        """Requests arrived and their sizes (the autoscaler's forecast)."""
        self.scaler = (
            ScalingLoop(autoscale, self._views, self._start_one, self._drain_one, self.traffic) if autoscale else None
        )
        self._paid = PaidTime()
        self._start_timeout = 600.0
        self._closing = False

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self, timeout: float = 600.0) -> CoreInfo:
        """Start the replicas (with an autoscaler: its minimum; the others wait, stopped, until it needs them)."""
        self._start_timeout = timeout
        initial = self.scaler.options.min_replicas if self.scaler is not None else len(self.replicas)
        starting, waiting = self.replicas[:initial], self.replicas[initial:]
        infos = await asyncio.gather(*(r.client.start(timeout) for r in starting))
        for r, info in zip(starting, infos):
            self._join(r, r.client, info)
        for r in waiting:
            r.state, r.reason = "stopped", "not needed yet"
        self._tasks["watch"] = asyncio.create_task(self._watch(), name="replica-watch")
        if self.scaler is not None:
            self._tasks["autoscale"] = asyncio.create_task(self.scaler.run(), name="autoscaler")
        if self.disagg is not None and self.disagg.roles is not None:
            self._tasks["roles"] = asyncio.create_task(self.disagg.roles.run(self.replicas), name="role-switch")
        self._paid = PaidTime(len(starting))
        first = infos[0]
        self.info = msgspec.structs.replace(
            first,
            max_num_seqs=sum(i.max_num_seqs for i in infos) + first.max_num_seqs * len(waiting),
            kv_capacity_tokens=min(i.kv_capacity_tokens for i in infos),
            usd_per_hour=sum(i.usd_per_hour for i in infos),
            kv_events_endpoint=None,
            kv_events_replay_endpoint=None,
        )
        return self.info

    def _join(self, r: Replica, client: EngineClient, info: CoreInfo) -> None:
        """A (re)started replica takes work: its KV index starts from its own events, its stream is read."""
        r.client, r.state, r.reason = client, "running", ""
        r.up_since = r.last_progress = time.monotonic()
        r.forget_work()
        if info.kv_events_endpoint is not None:
            self.index.follow(r.index, info.kv_events_endpoint, info.kv_events_replay_endpoint)
        self._tasks[f"read-{r.index}"] = asyncio.create_task(self._read(r, client), name=f"replica-{r.index}")
        parked, self._parked = self._parked, []
        for flight in parked:
            self._spawn(f"resume-{flight.request.request_id}", self._move(flight, "parked"))

    def _spawn(self, key: str, work: Coroutine[Any, Any, Any]) -> None:
        """Run `work` as a task the router cancels at shutdown; it is forgotten once done."""

        def done(finished: asyncio.Task) -> None:
            if self._tasks.get(key) is finished:
                del self._tasks[key]

        task = self._tasks[key] = asyncio.create_task(work, name=key)
        task.add_done_callback(done)

    @property
    def alive(self) -> bool:
        return self.dead is None and any(r.live for r in self.replicas)

    async def shutdown(self, timeout: float = 10.0) -> None:
        self._closing = True
        for task in self._tasks.values():
            task.cancel()
        await asyncio.gather(*(r.client.shutdown(timeout) for r in self.replicas), return_exceptions=True)
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
                plan[0].running.discard(group_id)
                plan[0].waiting_prefill.pop(group_id, None)
            if plan is not None and plan[0].live:
                replica, _, blocks = plan
                uncached = self._uncached(replica, blocks, len(prompt))
            else:
                blocks = plan[2] if plan is not None else prompt_blocks(prompt, self._block_size)
                replica = self._route(blocks, len(prompt), group_id)
                uncached = self._uncached(replica, blocks, len(prompt))
            predicted = self._predictions.pop(group_id, None)
            self.traffic.arrive(uncached, len(group))
            prefill = self._prefill_replica(replica, blocks, uncached, len(prompt))
            if prefill is not None:
                uncached = self._block_size  # what is left to compute where it decodes: the last, partial block
            for req in group:
                self._flights[req.request_id] = Flight(req, replica, pending=prefill is not None)
                replica.waiting_prefill[req.request_id] = uncached if req is group[0] else 1
            if predicted is not None:
                replica.predicted[group[0].request_id] = (time.monotonic(), predicted)
            replica.routed += len(group)
            self.policy.sent(replica.index, blocks)
            if prefill is not None:
                lacking = self._uncached(prefill, blocks, len(prompt))
                self._spawn(f"prefill-{group_id}", self._prefill_first(group, prefill, lacking))
            else:
                await self._send(replica, group)

    def _prefill_replica(self, decode: Replica, blocks: list[int], uncached: int, prompt_len: int) -> Replica | None:
        """Where the prompt is computed before it decodes on `decode`, if not there (tokenfab.cluster.disagg)."""
        if self.disagg is None:
            return None
        candidates = [
            (r, self._uncached(r, blocks, prompt_len))
            for r in self.replicas
            if r.live and r is not decode and r.role == "prefill" and not r.probation
        ]
        return self.disagg.choose_prefill(decode, uncached, self._block_size, candidates)

    async def _prefill_first(self, group: list[CoreRequest], prefill: Replica, lacking: int) -> None:
        """Run the group's prefill leg, then send the group where it decodes with the params to pull its KV (or,
        when the leg failed, without: the prompt is computed there)."""
        assert self.disagg is not None
        leg_request = self.disagg.leg(group[0])
        leg_id = leg_request.request_id
        leg = self.disagg.open(leg_id, group[0].request_id.split("#")[0], prefill)
        prefill.running.add(leg_id)
        prefill.waiting_prefill[leg_id] = lacking
        prefill.routed += 1
        out = None
        try:
            await prefill.client.add([leg_request])
            out = await asyncio.wait_for(asyncio.shield(leg.done), self.disagg.timeout_s)
        except (TimeoutError, EngineDead) as e:
            self.disagg.legs.pop(leg_id, None)
            log.warning("prefill leg %s on replica %d failed (%s)", leg_id, prefill.index, type(e).__name__)
            if prefill.client.alive:
                await prefill.client.abort([leg_id])
        finally:
            prefill.running.discard(leg_id)
            prefill.waiting_prefill.pop(leg_id, None)
        flights = [f for r in group if (f := self._flights.get(r.request_id)) is not None and f.pending]
        if not flights:  # aborted meanwhile: the prefill replica lets its export go
            if out is not None and out.kv_transfer is not None and prefill.client.alive:
                await prefill.client.abort([leg_id])
            return
        params = self.disagg.params(out)
        head = flights[0]
        if out is not None and out.cost is not None:
            head.carried = plus_cost(head.carried, out.cost)
        head.cached_tokens = out.num_cached_tokens if out is not None and params is not None else None
        by_replica: dict[int, list[CoreRequest]] = {}
        for f in flights:
            f.pending = False
            if not f.replica.live:  # its decode replica went meanwhile, and no other took it yet
                await self._move(f, "died")
                continue
            request = f.request
            if f is head and params is not None and f.request is group[0]:
                request = msgspec.structs.replace(request, kv_transfer=params)
            by_replica.setdefault(f.replica.index, []).append(request)
        for index, requests in by_replica.items():
            await self._send(self.replicas[index], requests)

    async def _send(self, replica: Replica, requests: list[CoreRequest]) -> None:
        ids = {r.request_id for r in requests}
        if not any(f.replica is replica and rid not in ids for rid, f in self._flights.items()):
            replica.last_progress = time.monotonic()  # idle until now: the hang clock starts here
        replica.running.update(ids)
        try:
            await replica.client.add(requests)
        except EngineDead as e:  # gone before its reader noticed: the loss moves these sequences with the rest
            log.warning("replica %d is gone (%s); its new sequences move when the loss is handled", replica.index, e)

    def _uncached(self, replica: Replica, blocks: list[int], prompt_len: int) -> int:
        return max(prompt_len - self._cached(replica, blocks) * self._block_size, 1)

    async def abort(self, request_ids: list[str]) -> None:
        by_replica: dict[int, list[str]] = {}
        for rid in request_ids:
            flight = self._flights.pop(rid, None)
            if flight is None:
                continue
            replica = flight.replica
            replica.running.discard(rid)
            replica.waiting_prefill.pop(rid, None)
            replica.predicted.pop(rid, None)
            parked = len(self._parked)
            self._parked = [f for f in self._parked if f is not flight]
            if len(self._parked) == parked and replica.client.alive:
                by_replica.setdefault(replica.index, []).append(rid)
        if self.disagg is not None:  # a prefill leg no sequence waits for any more
            for group_id in {rid.split("#")[0] for rid in request_ids}:
                leg = self.disagg.legs.get(f"{group_id}@prefill")
                if leg is not None and not self._group_flights(group_id):
                    del self.disagg.legs[f"{group_id}@prefill"]
                    leg.done.cancel()
                    if leg.replica.client.alive:
                        by_replica.setdefault(leg.replica.index, []).append(f"{group_id}@prefill")
        for index, ids in by_replica.items():
            await self.replicas[index].client.abort(ids)

    def _group_flights(self, group_id: str) -> list[Flight]:
        return [f for rid, f in self._flights.items() if rid.split("#")[0] == group_id]

    def _route(self, blocks: list[int], prompt_len: int, request_id: str, avoid: Replica | None = None) -> Replica:
        live = [r for r in self.replicas if r.live and r is not avoid]
        if not live:
            raise EngineDead("no replica is running")
        # Prefill replicas take requests only when no replica that decodes is left.
        live = [r for r in live if takes_requests(r.role)] or live
        # A replica on probation (just restarted after failing) takes one sequence at a time, unless it is all
        # there is: the half-open state of a circuit breaker.
        trusted = [r for r in live if not r.probation or not r.running]
        live = trusted or live
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

    # -- losing a replica, and continuing its sequences elsewhere -----------------------------------------------

    async def _watch(self) -> None:
        """Every so often: a replica with work that has not stepped within hang_timeout is hung; it is killed. The
        replicas' paid-for time is counted here too."""
        while True:
            await asyncio.sleep(min(1.0, self.hang_timeout / 4))
            self.replica_seconds()
            try:
                await self._kill_hung()
            except Exception:  # noqa: BLE001 - the watch must outlive one failed round
                log.exception("replica watch")

    # -- scaling (the autoscaler's view and hands) -----------------------------------------------------------------

    def _views(self, now: float) -> list[ReplicaView]:
        return [
            ReplicaView(r.load(), now - r.up_since if r.live else 0.0, not r.live)
            for r in self.replicas
            if r.live or r.state in ("starting", "restarting")
        ]

    async def _start_one(self) -> int | None:
        stopped = [r for r in self.replicas if r.state == "stopped" and r.factory is not None]
        if not stopped:
            return None
        await self.resume(stopped[0].index)
        return stopped[0].index

    def _drain_one(self, index: int) -> None:
        """Drain without moving: its sequences finish where they are (nothing is recomputed)."""
        self._spawn(f"drain-{index}", self.drain(index, move=False))

    async def _kill_hung(self) -> None:
        now = time.monotonic()
        for r in self.replicas:
            if r.state != "running" or not r.running or now - r.last_progress <= self.hang_timeout:
                continue
            legs = self.disagg.legs.values() if self.disagg is not None else ()
            if not any(f.replica is r for f in self._flights.values()) and not any(g.replica is r for g in legs):
                continue  # only placements not yet added
            why = f"no step for {now - r.last_progress:.1f} s while it had work"
            log.warning("replica %d hung (%s): killing it", r.index, why)
            reader = self._tasks.pop(f"read-{r.index}", None)
            if reader is not None:
                reader.cancel()
            await self._lost(r, r.client, why, cause="hung")

    async def _read(self, r: Replica, client: EngineClient) -> None:
        try:
            async for result in client.results():
                if r.client is not client:
                    return
                r.observe(result.stats)
                r.last_progress = time.monotonic()
                self._results.put_nowait((r, result))
        except EngineDead as e:
            if r.client is client and r.state in ("running", "draining"):
                await self._lost(r, client, str(e).splitlines()[0], cause="died")

    async def _lost(self, r: Replica, client: EngineClient, why: str, cause: str) -> None:
        """The replica stopped serving: its sequences continue elsewhere; it restarts if it can."""
        r.state, r.reason = "dead", why
        if time.monotonic() - r.up_since >= STABLE_SECONDS:
            r.failures = 0
        r.failures += 1
        self.index.forget(r.index)
        log.warning("replica %d lost (%s)", r.index, why)
        if self.disagg is not None:
            self.disagg.fail(r)
        await self._evacuate(r, cause)
        await client.shutdown(1.0)  # kills what is left of it and releases its sockets
        if r.factory is not None and not self._closing:
            r.state = "restarting"
            self._spawn(f"restart-{r.index}", self._restart(r))
        elif not any(x.state in ("running", "draining", "restarting", "starting") for x in self.replicas):
            self.dead = "every replica is gone"
            for flight in self._parked:
                self._give_up(flight, self.dead)
            self._parked.clear()
            self._results.put_nowait(EngineDead(self.dead))

    async def _evacuate(self, r: Replica, cause: str) -> None:
        flights = [f for f in self._flights.values() if f.replica is r]
        r.forget_work()
        for flight in flights:
            await self._move(flight, cause)

    async def _move(self, flight: Flight, cause: str) -> None:
        """Continue a sequence on another replica from its prompt + the tokens passed on so far."""
        rid = flight.request.request_id
        if self._flights.get(rid) is not flight:
            return  # aborted meanwhile
        old = flight.replica
        if not self.migration or flight.migrations >= self.max_migrations:
            why = "migration is off" if not self.migration else f"moved {flight.migrations} times already"
            self._give_up(flight, f"replica {old.index} was lost ({old.reason}); {why}")
            return
        if not any(r.live and r is not old for r in self.replicas):
            # Parked until a replica (re)joins: one restarting, or the lost one itself, which restarts (the ranks of
            # an expert-parallel group all go down together and come back together).
            if any(r.state in ("restarting", "starting") for r in self.replicas) or (
                old.factory is not None and not self._closing
            ):
                self._parked.append(flight)
                return
            self._give_up(flight, f"replica {old.index} was lost ({old.reason}) and no other replica runs")
            return
        tokens = flight.request.prompt_token_ids + flight.generated
        blocks = prompt_blocks(tokens, self._block_size)
        target = self._route(blocks, len(tokens), rid, avoid=old)
        if flight.pending:  # its prefill leg runs elsewhere: it is sent where it now decodes once that is done
            flight.replica = target
            return
        request = flight.request
        params = request.params
        if flight.generated and params.prompt_logprobs is not None:
            params = dataclasses.replace(params, prompt_logprobs=None)  # already sent with the first token
        resumed = msgspec.structs.replace(
            request, params=params, output_token_ids=list(flight.generated), leader_id=None
        )
        if flight.cost is not None:
            flight.carried = plus_cost(flight.carried, flight.cost)
            flight.cost = None
        flight.replica = target
        flight.migrations += 1
        old.migrated_away += 1
        self.migrations[cause] += 1
        target.routed += 1
        target.waiting_prefill[rid] = self._uncached(target, blocks, len(tokens))
        log.info(
            "sequence %s moved from replica %d to %d after %d tokens (%s)",
            rid,
            old.index,
            target.index,
            len(flight.generated),
            cause,
        )
        await self._send(target, [resumed])

    def _give_up(self, flight: Flight, why: str) -> None:
        rid = flight.request.request_id
        self._flights.pop(rid, None)
        self.migrations["lost"] += 1
        self._results.put_nowait(
            (None, StepResult([CoreOutput(rid, [], finish_reason="abort", lost=why)], self.merged_stats()))
        )

    async def _restart(self, r: Replica, probation: bool = True) -> None:
        """Start the replica again (after a failure: with backoff, and on probation once it joins)."""
        assert r.factory is not None
        while not self._closing:
            delay = RESTART_BACKOFF[min(r.failures, len(RESTART_BACKOFF)) - 1] if r.failures else 0.0
            log.info("replica %d restarts in %.0f s", r.index, delay)
            await asyncio.sleep(delay)
            client = r.factory()
            try:
                info = await client.start(self._start_timeout)
            except Exception as e:  # noqa: BLE001 - a failed start is retried, whatever failed
                r.failures += 1
                r.reason = f"restart failed: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
                log.warning("replica %d: %s", r.index, r.reason)
                await client.shutdown(1.0)
                continue
            self._join(r, client, info)
            if probation:
                r.restarts += 1
                r.probation = PROBATION
                log.info("replica %d rejoined (restart %d)", r.index, r.restarts)
            else:
                log.info("replica %d resumed", r.index)
            return

    async def drain(self, index: int, move: bool | None = None) -> dict:
        """Stop sending the replica work, move its sequences to the others (with migration off, or `move` False:
        let them finish there) and stop it; it stays stopped until `resume`. The last replica taking work cannot be
        drained."""
        if not 0 <= index < len(self.replicas):
            raise KeyError(f"no replica {index}")
        r = self.replicas[index]
        if r.state != "running":
            raise ValueError(f"replica {index} is {r.state}, not running")
        if not any(x.live and x is not r for x in self.replicas):
            raise ValueError(f"replica {index} is the last one running; it cannot be drained")
        r.state, r.reason = "draining", "drained"
        held = [f.request.request_id for f in self._flights.values() if f.replica is r]
        move = self.migration if move is None else move
        if move:
            if held:
                await r.client.abort(held)
            await self._evacuate(r, "drained")
        else:
            while r.client.alive and any(f.replica is r for f in self._flights.values()):
                await asyncio.sleep(0.05)
        reader = self._tasks.pop(f"read-{r.index}", None)
        if reader is not None:
            reader.cancel()
        self.index.forget(r.index)
        await r.client.shutdown(10.0)
        r.state = "stopped"
        self.replica_seconds()  # the time before counted at the old number of replicas
        return {"id": index, "state": r.state, "moved" if move else "finished": len(held)}

    async def resume(self, index: int) -> dict:
        """Start a drained replica again (it joins once its model is loaded)."""
        if not 0 <= index < len(self.replicas):
            raise KeyError(f"no replica {index}")
        r = self.replicas[index]
        if r.state != "stopped" or r.factory is None:
            raise ValueError(f"replica {index} is {r.state}; only a drained replica can be resumed")
        r.state, r.failures = "restarting", 0
        self.replica_seconds()  # the time before counted at the old number of replicas
        self._spawn(f"restart-{r.index}", self._restart(r, probation=False))
        return {"id": index, "state": r.state}

    # -- results ------------------------------------------------------------------------------------------------

    async def _next(self) -> FromCore:
        while True:
            item = await self._results.get()
            if isinstance(item, EngineDead):
                raise item
            replica, result = item
            if replica is None:
                return result
            outputs = [out for out in result.outputs if self._settle(replica, out)]
            if outputs or not result.outputs:
                return StepResult(outputs, self.merged_stats())

    def _settle(self, replica: Replica, out: CoreOutput) -> bool:
        """Account for one output; False for one from a replica its sequence has left (or that was aborted)."""
        if self.disagg is not None and self.disagg.settle(out):
            return False  # a prefill leg's: its task takes it
        flight = self._flights.get(out.request_id)
        if flight is None or flight.replica is not replica:
            return False
        if out.new_token_ids or out.finish_reason is not None:
            replica.waiting_prefill.pop(out.request_id, None)
            sent = replica.predicted.pop(out.request_id, None)
            if sent is not None and out.new_token_ids:
                self.ttft_seconds["predicted"] += sent[1]
                self.ttft_seconds["actual"] += time.monotonic() - sent[0]
            if flight.cached_tokens is None:
                flight.cached_tokens = out.num_cached_tokens
        if out.new_token_ids and flight.first_at is None:
            flight.first_at = time.monotonic()
        flight.generated.extend(out.new_token_ids)
        if flight.cached_tokens is not None:  # its first replica's (or, split, its prefill replica's) count
            out.num_cached_tokens = flight.cached_tokens
        if out.cost is not None:
            flight.cost = out.cost
            if flight.carried is not None:
                out.cost = plus_cost(flight.carried, out.cost)
        if out.finish_reason is not None:
            replica.running.discard(out.request_id)
            del self._flights[out.request_id]
            if out.error is None:
                self.traffic.finish(len(flight.generated))
            roles = self.disagg.roles if self.disagg is not None else None
            if roles is not None and flight.first_at is not None and out.error is None:
                n = len(flight.generated)
                tpot = (time.monotonic() - flight.first_at) / (n - 1) if n > 1 else None
                roles.observe(flight.first_at - flight.request.arrival, tpot)
            if replica.probation and out.error is None:
                replica.probation -= 1
        return True

    def merged_stats(self) -> EngineStats:
        """The running replicas' latest stats summed (KV usage recomputed from the summed blocks)."""
        parts = [r.client.stats for r in self.replicas if r.client.stats is not None and r.client.alive]
        total = sum_stats(parts)
        used = total.kv.total_blocks - total.kv.free_blocks
        kv = msgspec.structs.replace(total.kv, usage=used / total.kv.total_blocks if total.kv.total_blocks else 0.0)
        return msgspec.structs.replace(total, time=max(p.time for p in parts) if parts else time.monotonic(), kv=kv)

    def replica_seconds(self) -> float:
        """Replica time paid for so far: seconds summed over replicas starting, running or draining (tallied every
        second, at every start and stop, and whenever it is read)."""
        return self._paid.update(sum(r.state not in ("stopped", "dead") for r in self.replicas))

    def autoscale_state(self) -> dict:
        """What /replicas shows of the autoscaler: its bounds and decisions, the replicas and time paid for."""
        assert self.scaler is not None
        paid = sum(r.state not in ("stopped", "dead") for r in self.replicas)
        return {**self.scaler.state(), "replicas": paid, "replica_seconds": round(self.replica_seconds(), 1)}

    def disagg_state(self) -> dict:
        """What /replicas shows of prefill/decode disaggregation: its decisions, and with auto the mode."""
        assert self.disagg is not None
        out: dict = {"decisions": dict(self.disagg.decisions), "prefill_legs_in_flight": len(self.disagg.legs)}
        roles = self.disagg.roles
        if roles is not None:
            out |= {"mode": "split" if roles.split else "aggregated", "switches": dict(roles.switches)}
        return out

    def states(self) -> list[dict]:
        """Per replica: its state and why (what /health shows; cheap, unlike `describe`)."""
        return [{"id": r.index, "state": r.state, "reason": r.reason} for r in self.replicas]

    def describe(self) -> list[dict]:
        """Per replica: what /replicas shows (the index brought up to the events that have arrived)."""
        self.index.refresh()
        now = time.monotonic()
        return [r.describe(now, len(self.index.blocks(r.index)), self.index.lag.get(r.index)) for r in self.replicas]
