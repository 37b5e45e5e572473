"""The router's bookkeeping without engines (fake replicas driven by the test): a sequence whose replica dies
continues on another from its prompt + the tokens passed on, with its cost carried over and its first replica's
cached-token count; what the dead replica sent late is dropped; aborted sequences stop counting as load; past
max_migrations (or with migration off) a sequence is reported lost."""

from __future__ import annotations

import asyncio
import random

import pytest

from tokenfab.cluster.autoscaler import AutoscaleOptions
from tokenfab.cluster.policies import LeastLoad
from tokenfab.cluster.router import Router
from tokenfab.economics.attribution import RequestCost
from tokenfab.engine.client import EngineClient, EngineDead
from tokenfab.engine.ipc import FromCore, StepResult
from tokenfab.engine.messages import CoreInfo, CoreOutput, CoreRequest
from tokenfab.engine.stats import CostStats, EngineStats, KVStats, PrefixCacheStats, SchedulerStats, SpecStats
from tokenfab.engine.types import SamplingParams

INFO = CoreInfo("fake", 1024, 100, 4096, 8, 512, "float32", "modelled", "", 0.1, 0.1)


def stats() -> EngineStats:
    return EngineStats(0.0, SchedulerStats(), KVStats(), PrefixCacheStats(), SpecStats(), CostStats())


class Fake(EngineClient):
    """A replica whose outputs the test sends; `die` ends its stream."""

    def __init__(self) -> None:
        super().__init__()
        self.added: list[CoreRequest] = []
        self.aborted: list[str] = []
        self._queue: asyncio.Queue[FromCore | Exception] = asyncio.Queue()
        self._dead = False

    async def start(self, timeout: float = 600.0) -> CoreInfo:
        self.info = INFO
        return INFO

    async def add(self, requests: list[CoreRequest]) -> None:
        self.added += requests

    async def abort(self, request_ids: list[str]) -> None:
        self.aborted += request_ids

    async def _next(self) -> FromCore:
        item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    @property
    def alive(self) -> bool:
        return not self._dead and self.info is not None

    async def shutdown(self, timeout: float = 10.0) -> None:
        self._dead = True

    def send(self, *outputs: CoreOutput) -> None:
        self._queue.put_nowait(StepResult(list(outputs), stats()))

    def die(self) -> None:
        self._dead = True
        self._queue.put_nowait(EngineDead("killed"))


def request(rid: str) -> CoreRequest:
    return CoreRequest(rid, [5, 6, 7, 8], SamplingParams(max_tokens=10, temperature=0), 0.0)


async def next_outputs(router: Router) -> list[CoreOutput]:
    results = router.results()
    while True:
        result = await asyncio.wait_for(results.__anext__(), 5)
        if result.outputs:
            return result.outputs


def make(n: int = 2, **kw) -> tuple[Router, list[Fake]]:
    fakes = [Fake() for _ in range(n)]
    return Router(list(fakes), LeastLoad(random.Random(0)), **kw), fakes


def test_a_sequence_continues_on_another_replica_with_its_tokens_and_cost():
    async def go() -> None:
        router, (a, b) = make()
        await router.start()
        await router.add([request("r")])
        first, other = (a, b) if a.added else (b, a)
        first.send(CoreOutput("r", [11, 12], num_cached_tokens=4, cost=RequestCost(1.0, 2.0, 3.0)))
        assert [o.new_token_ids for o in await next_outputs(router)] == [[11, 12]]
        first.die()
        await asyncio.sleep(0.05)
        resumed = other.added[-1]
        assert (resumed.request_id, resumed.prompt_token_ids, resumed.output_token_ids) == ("r", [5, 6, 7, 8], [11, 12])
        first.send(CoreOutput("r", [99]))  # late, from the replica it left: dropped
        other.send(CoreOutput("r", [13], finish_reason="length", num_cached_tokens=6, cost=RequestCost(0.5, 0.5, 0.5)))
        (out,) = await next_outputs(router)
        assert out.new_token_ids == [13] and out.num_cached_tokens == 4
        assert out.cost == RequestCost(1.5, 2.5, 3.5)
        assert router.migrations["died"] == 1 and [r.state for r in router.replicas].count("dead") == 1
        assert all(not r.running for r in router.replicas)
        await router.shutdown()

    asyncio.run(go())


def test_aborted_sequences_stop_counting_as_load():
    async def go() -> None:
        router, fakes = make()
        await router.start()
        await router.add([request(f"r{i}") for i in range(3)])
        assert sum(len(r.running) for r in router.replicas) == 3
        await router.abort(["r0", "r1", "r2"])
        assert sum(len(r.running) for r in router.replicas) == 0
        assert sorted(sum((f.aborted for f in fakes), [])) == ["r0", "r1", "r2"]
        await router.shutdown()

    asyncio.run(go())


@pytest.mark.parametrize("options", [{"migration": False}, {"max_migrations": 0}])
def test_a_sequence_that_may_not_move_is_reported_lost(options):
    async def go() -> None:
        router, (a, b) = make(**options)
        await router.start()
        await router.add([request("r")])
        first = a if a.added else b
        first.die()
        (out,) = await next_outputs(router)
        assert out.finish_reason == "abort" and "replica" in (out.lost or "")
        assert router.migrations["lost"] == 1 and router.alive  # the other replica still serves
        await router.shutdown()

    asyncio.run(go())


def test_when_the_last_replica_goes_the_router_is_dead():
    async def go() -> None:
        router, (a,) = make(1)
        await router.start()
        await router.add([request("r")])
        a.die()
        (out,) = await next_outputs(router)
        assert out.lost is not None
        with pytest.raises(EngineDead):
            await asyncio.wait_for(router.results().__anext__(), 5)
        assert not router.alive
        await router.shutdown()

    asyncio.run(go())


def test_a_restarted_replica_takes_one_sequence_at_a_time_until_it_has_finished_two():
    async def go() -> None:
        made: list[Fake] = []

        def factory() -> Fake:
            made.append(Fake())
            return made[-1]

        router = Router([factory(), factory()], LeastLoad(random.Random(0)), [factory, factory])
        await router.start()
        await router.add([request("r0")])
        victim = next(i for i, f in enumerate(made) if f.added)
        made[victim].die()
        for _ in range(100):  # restarted after the first backoff step (1 s)
            await asyncio.sleep(0.05)
            if router.replicas[victim].restarts:
                break
        fresh = made[-1]
        assert router.replicas[victim].client is fresh and router.describe()[victim]["probation"] == 2
        await router.add([request(f"a{i}") for i in range(4)])
        assert [r.request_id for r in fresh.added] == ["a0"]  # the others went to the trusted replica
        for n, rid in enumerate(["a0", "b0"]):
            if rid != "a0":
                await router.add([request(rid)])
                assert fresh.added[-1].request_id == rid
            fresh.send(CoreOutput(rid, [7], finish_reason="length"))
            await next_outputs(router)
            assert router.describe()[victim]["probation"] == 1 - n
        await router.add([request(f"c{i}") for i in range(4)])
        assert sum(r.request_id.startswith("c") for r in fresh.added) >= 2  # its share again
        await router.shutdown()

    asyncio.run(go())


def test_the_autoscaler_resumes_a_replica_under_load_and_drains_it_after():
    async def go() -> None:
        made: list[Fake] = []

        def factory() -> Fake:
            made.append(Fake())
            return made[-1]

        options = AutoscaleOptions(1, 2, slo_ttft=10.0, slo_tpot=0.05, interval_s=0.05, up_after=1, down_after_s=0.3,
                                   warmup_s=0.0, smooth_up_s=0.0, smooth_down_s=0.0)  # fmt: skip
        router = Router([factory(), factory()], LeastLoad(random.Random(0)), [factory, factory], autoscale=options)
        await router.start()
        assert [r["state"] for r in router.states()] == ["running", "stopped"] and made[1].info is None
        # 100 sequences on the one replica: its step fit (the defaults: 2 ms + 0.5 ms a sequence) predicts a
        # 52 ms TPOT, over 0.8 x 50 ms: the stopped replica is started (a fresh client from its factory).
        await router.add([request(f"r{i}") for i in range(100)])
        for _ in range(100):
            await asyncio.sleep(0.02)
            if router.states()[1]["state"] == "running":
                break
        assert router.replicas[1].client is made[2] and router.replicas[1].probation == 0
        assert router.scaler is not None and dict(router.scaler.decisions) == {("up", "predicted tpot near the SLO"): 1}
        # They finish: one replica absorbs what is left (nothing), so after 0.3 s one is drained and stopped.
        made[0].send(*[CoreOutput(f"r{i}", [1], finish_reason="length") for i in range(100)])
        await next_outputs(router)
        for _ in range(100):
            await asyncio.sleep(0.02)
            if "stopped" in [r["state"] for r in router.states()]:
                break
        assert sorted(r["state"] for r in router.states()) == ["running", "stopped"]
        assert router.scaler.decisions[("down", "the others absorb the load")] == 1
        state = router.autoscale_state()
        assert state["replicas"] == 1 and state["last"] is not None and state["replica_seconds"] > 0
        await router.shutdown()

    asyncio.run(go())
