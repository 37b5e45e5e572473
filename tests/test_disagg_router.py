"""The router's prefill/decode split without engines (fake replicas driven by the test): a long prompt's prefill leg
runs on the prefill replica and the request then goes to the decode replica with the leg's kv_transfer_params, its
cost including the leg's; a leg whose replica dies, or that errs, leaves the prompt to the decode replica; an abort
during the leg stops it; short prompts stay where they decode; `--disaggregation auto` switches roles on measured
SLO misses, not before its dwell time, and back."""

from __future__ import annotations

import asyncio
import random

from test_router_migration import Fake, next_outputs

from tokenfab.cluster.disagg import Disaggregation, RoleSwitch
from tokenfab.cluster.policies import LeastLoad
from tokenfab.cluster.router import Router
from tokenfab.economics.attribution import RequestCost
from tokenfab.engine.messages import CoreOutput, CoreRequest
from tokenfab.engine.types import KVTransferParams, SamplingParams

LONG = list(range(5, 105))  # 6 full blocks of 16
SHORT = [5, 6, 7, 8, 9]
PARAMS = KVTransferParams(do_remote_prefill=True, remote_engine_id="p0", remote_endpoint="ipc:///x",
                          transfer_id="r@prefill", transport="shm", remote_blocks=6)


def request(rid: str, prompt: list[int]) -> CoreRequest:
    return CoreRequest(rid, prompt, SamplingParams(max_tokens=10, temperature=0), 0.0)


def make(always: bool = True) -> tuple[Router, Fake, Fake]:
    p, d = Fake(), Fake()
    router = Router([p, d], LeastLoad(random.Random(0)), roles=["prefill", "decode"],
                    disaggregation=Disaggregation(always=always))
    return router, p, d


async def settle() -> None:
    await asyncio.sleep(0.05)


def test_the_prefill_leg_runs_first_and_the_request_pulls_its_kv():
    async def go() -> None:
        router, p, d = make()
        await router.start()
        await router.add([request("r", LONG)])
        await settle()
        (leg,) = p.added
        assert leg.request_id == "r@prefill" and leg.params.max_tokens == 1 and leg.kv_transfer.do_remote_decode
        assert not d.added  # not before its prompt is computed
        reading = asyncio.create_task(next_outputs(router))  # the front end reads the router's stream
        p.send(CoreOutput("r@prefill", [42], finish_reason="length", num_cached_tokens=32,
                          cost=RequestCost(1.0, 1.0, 1.0), kv_transfer=PARAMS))
        await settle()
        (sent,) = d.added
        assert sent.request_id == "r" and sent.kv_transfer == PARAMS and sent.prompt_token_ids == LONG
        d.send(CoreOutput("r", [7], finish_reason="length", num_cached_tokens=96, cost=RequestCost(0.5, 0.5, 0.5)))
        (out,) = await reading
        assert out.new_token_ids == [7] and out.cost == RequestCost(1.5, 1.5, 1.5)
        assert out.num_cached_tokens == 32  # what the prefill replica found cached, not what was pulled
        assert router.disagg.decisions == {"remote": 1}
        assert not any(r.running for r in router.replicas)
        await router.shutdown()

    asyncio.run(go())


def test_a_failed_leg_leaves_the_prompt_to_the_decode_replica():
    async def go() -> None:
        router, p, d = make()
        await router.start()
        reading = asyncio.create_task(next_outputs(router))
        await router.add([request("a", LONG)])
        await settle()
        p.send(CoreOutput("a@prefill", [], finish_reason="abort", error="prompt too long"))
        await settle()
        assert d.added[-1].request_id == "a" and d.added[-1].kv_transfer is None
        await router.add([request("b", LONG[1:])])
        await settle()
        p.die()  # the prefill replica is lost during b's leg
        await settle()
        assert d.added[-1].request_id == "b" and d.added[-1].kv_transfer is None
        assert router.disagg.decisions["fallback"] == 2
        d.send(CoreOutput("b", [3], finish_reason="length"))
        assert [o.new_token_ids for o in await reading] == [[3]]
        await router.shutdown()

    asyncio.run(go())


def test_an_abort_during_the_leg_stops_it_and_short_prompts_stay_local():
    async def go() -> None:
        router, p, d = make(always=False)
        await router.start()
        await router.add([request("s", SHORT)])
        await settle()
        assert [r.request_id for r in d.added] == ["s"] and not p.added  # nothing worth moving
        assert router.disagg.decisions == {"local (short)": 1}
        router.disagg.always = True
        reading = asyncio.create_task(next_outputs(router))
        await router.add([request("x", LONG)])
        await settle()
        await router.abort(["x"])
        await settle()
        assert p.aborted == ["x@prefill"] and [r.request_id for r in d.added] == ["s"]
        p.send(CoreOutput("x@prefill", [1], finish_reason="length", kv_transfer=PARAMS))  # late: dropped
        await settle()
        assert [r.request_id for r in d.added] == ["s"]
        reading.cancel()
        await router.shutdown()

    asyncio.run(go())


def test_auto_tries_split_on_tpot_misses_and_does_not_flap_back():
    roles = RoleSwitch(slo_ttft=2.0, slo_tpot=0.1, dwell_s=20, window_s=30, min_samples=8, switched_at=0.0)
    for t in range(10):
        roles.observe(0.5, 0.05, now=1.0 + t)  # all within the SLO
    assert roles.decide(prefill_busy=0.3, now=25.0) is None
    for t in range(10):
        roles.observe(0.5, 0.3, now=26.0 + t)  # decoders stalled by prompts: goodput 0.5 over the window
    assert roles.decide(prefill_busy=0.9, now=40.0) is None  # one replica could not carry the prompts
    assert roles.decide(prefill_busy=0.3, now=40.0) == "split"
    roles.switched("split", now=40.0)
    for t in range(10):
        roles.observe(4.0, 0.03, now=41.0 + t)  # split: the prefill replica's queue; goodput 0
    assert roles.decide(prefill_busy=0.5, now=55.0) is None  # dwell
    assert roles.decide(prefill_busy=0.5, now=61.0) == "aggregated"  # aggregated had 0.5: back
    roles.switched("aggregated", now=61.0)
    assert roles.switches == {"split": 1, "aggregated": 1} and not roles.split
    for t in range(10):
        roles.observe(0.5, 0.3, now=62.0 + t)  # the same TPOT misses again, goodput 0.
    assert roles.decide(prefill_busy=0.3, now=90.0) is None  # split scored 0 within memory: not tried again
    for t in range(10):
        roles.observe(0.5, 0.3, now=400.0 + t)
    assert roles.decide(prefill_busy=0.3, now=410.0) == "split"  # forgotten after memory_s: worth a new try


def test_auto_returns_to_a_mode_that_measured_better():
    roles = RoleSwitch(dwell_s=5, window_s=30, min_samples=4, switched_at=0.0)
    for t in range(6):
        roles.observe(0.5, 0.3 if t % 2 else 0.05, now=1.0 + t)  # goodput 0.5, TPOT misses
    assert roles.decide(prefill_busy=0.2, now=10.0) == "split"
    roles.switched("split", now=10.0)
    for t in range(6):
        roles.observe(0.5, 0.05, now=11.0 + t)  # split meets both SLOs
    assert roles.decide(prefill_busy=0.2, now=20.0) is None  # better than aggregated's 0.5: stays


def test_the_ladder_gains_the_disaggregation_rung():
    from tokenfab.bench.ladder import rungs

    *_, aggregated, auto = rungs((1, 4), replicas=2)
    assert auto.name == "+ disaggregation (auto)"
    assert auto.flags == (*aggregated.flags, "--disaggregation", "auto")


def test_auto_turns_the_least_busy_replica_into_a_prefill_replica_and_back():
    import msgspec

    from test_router_migration import stats

    async def go() -> None:
        roles = RoleSwitch(dwell_s=0, window_s=30, min_samples=4, switched_at=0.0)
        a, b = Fake(), Fake()
        router = Router([a, b], LeastLoad(random.Random(0)), disaggregation=Disaggregation(roles=roles))
        await router.start()
        await router.add([request("busy", LONG)])  # one sequence on one replica: the other is the least busy
        busy = next(r for r in router.replicas if r.running)

        def load(prompt_tokens: int) -> None:
            for fake in (a, b):
                s = stats()
                fake.stats = msgspec.structs.replace(
                    s, scheduler=msgspec.structs.replace(s.scheduler, prompt_tokens_computed=prompt_tokens))

        load(0)
        assert roles.look(router.replicas, now=100.0) is None  # the first look only measures
        for t in range(6):
            roles.observe(0.5, 0.3 if t % 2 else 0.05, now=101.0 + t)  # TPOT misses: decoders stalled by prompts
        load(1000)  # 100 prompt tokens/s over 10 s: far from one replica's capacity
        assert roles.look(router.replicas, now=110.0) == "split"
        assert [r.role for r in router.replicas if r is not busy] == ["prefill"] and busy.role == "both"
        assert router.disagg_state()["mode"] == "split"
        for t in range(6):
            roles.observe(4.0, 0.03, now=111.0 + t)  # the prefill replica's queue: worse than aggregated's 0.5
        load(2000)
        assert roles.look(router.replicas, now=120.0) == "aggregated"
        assert [r.role for r in router.replicas] == ["both", "both"]
        await router.shutdown()

    asyncio.run(go())
