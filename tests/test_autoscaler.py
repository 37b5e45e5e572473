"""The autoscaler: on a step-function load in the simulator it scales up through the surge and back down after it
without oscillating, holds a steady load at one replica count, ignores a cold replica's samples, scales down only
when the survivors can absorb the load, forecasts a surge from its arrivals before the sequences pile up, and keeps
to its bounds."""

from __future__ import annotations

import math
import random
from dataclasses import replace

import pytest

from tokenfab.bench.records import SLO
from tokenfab.bench.stats import summarize
from tokenfab.cluster.autoscaler import AutoscaleOptions, Autoscaler, ReplicaView, Traffic
from tokenfab.cluster.policies import ReplicaLoad, make_policy
from tokenfab.sim.simulator import ReplicaShape, Simulator, autoscale, open_loop
from tokenfab.sim.step_cost import StepCostModel

# A replica steps in 20 ms + 4 ms per decoding sequence and prefills 2,500 tokens/s: about 5 requests/s of 128
# tokens in, 32 out, within a 0.1 s TPOT.
COST = StepCostModel({"overhead": 0.02, "prefill_tokens": 4e-4, "prefill_attention": 0.0, "decode_seqs": 0.004,
                      "decode_context": 0.0})  # fmt: skip
SHAPE = ReplicaShape([None], [4000], 16, 64, 512, 2048)
OPTIONS = AutoscaleOptions(min_replicas=1, max_replicas=4, slo_ttft=1.0, slo_tpot=0.1)


def run(phases: list[tuple[float, float]], seed: int = 0, forecast: bool = True):
    """Poisson arrivals at each phase's rate for its seconds; returns the simulator and the scaler's history."""
    rng, arrivals, t = random.Random(seed), [], 0.0
    for rate, seconds in phases:
        end = t + seconds
        while t < end:
            arrivals.append(t)
            t += rng.expovariate(rate)
        t = end
    requests = [([1000 + (i * 131 + j) % 9000 for j in range(128)], 32) for i in range(len(arrivals))]
    sim = Simulator(SHAPE, COST, 1, make_policy("kv", slo_ttft=1.0, slo_tpot=0.1))
    open_loop(sim, requests, 1.0, 1.0, arrivals=arrivals)
    history = autoscale(sim, Autoscaler(replace(OPTIONS, forecast=forecast)), cold_start_s=10.0)
    sim.run()
    return sim, history


def changes(history) -> list[int]:
    """+1 / -1 for each change of the replica count, in order."""
    counts = [1] + [n for _, n, _ in history]
    return [1 if b > a else -1 for a, b in zip(counts, counts[1:]) if b != a]


def test_a_step_function_load_scales_up_then_down_without_oscillating():
    sim, history = run([(1.0, 120), (12.0, 120), (1.0, 180)])
    steps = changes(history)
    # Up through the surge, down after it, never back: one change of direction.
    assert steps and steps[0] == 1 and sum(a != b for a, b in zip(steps, steps[1:])) == 1
    assert all(n == 1 for t, n, _ in history if t < 120)
    peak = max(n for _, n, _ in history)
    assert 3 <= peak <= OPTIONS.max_replicas
    # The surge needs three (12/s over about 5/s each); a fourth may come for the backlog while they start.
    assert all(n >= 3 for t, n, _ in history if 150 <= t < 240)
    assert history[-1][1] == 1
    # Paid for: one replica throughout plus the extra ones for about the surge (and their drain), not the peak
    # count all along.
    assert 420 + 2 * 120 < sim.replica_seconds() < peak * 420 * 0.6
    s = summarize(sim.records, slo=SLO(1.0, 0.1))
    assert s.completed == s.sent and s.goodput_fraction > 0.75  # the surge arrives faster than a replica starts


def test_the_arrivals_bring_the_first_start_forward_on_a_surge():
    # The same surge as above, with and without the arrivals' forecast: the load seen alone waits for the surge's
    # sequences to pile up (and for its moving average); the forecast sees the surge in its arrivals.
    firsts = {}
    for forecast in (True, False):
        sim, history = run([(1.0, 120), (12.0, 120), (1.0, 180)], forecast=forecast)
        firsts[forecast] = min(t for t, _, d in history if d.action == "up" and t > 100) - 120
        s = summarize(sim.records, slo=SLO(1.0, 0.1))
        assert s.completed == s.sent
    assert firsts[True] <= 6.0 and firsts[True] < firsts[False]


def test_a_steady_load_settles_on_one_count():
    # A warm replica first, then a steady 7 requests/s (Poisson: bursts included) that one replica cannot serve.
    sim, history = run([(1.0, 30), (7.0, 400)])
    steps = changes(history)
    # Up (past what it needs while the backlog of the first seconds clears), then down to it, and never up again.
    # It keeps 3: on 2 the arrivals' prompts (18 % of each replica's time) stretch a decode step to 0.056 s
    # predicted, over half the TPOT SLO, which is where scaling down stops (the hysteresis).
    assert steps and steps[0] == 1 and sum(a != b for a, b in zip(steps, steps[1:])) <= 1
    assert {n for t, n, _ in history if 230 <= t <= 430} == {3}
    s = summarize(sim.records, slo=SLO(1.0, 0.1))
    assert s.goodput_fraction > 0.9


def view(index: int, running: int, queued: int = 0, up_s: float = 60.0, step: float = 0.02, per_seq: float = 0.004,
         starting: bool = False) -> ReplicaView:  # fmt: skip
    load = ReplicaLoad(index, running, queued, prefill_tokens_per_s=2500, decode_seconds_per_seq=per_seq,
                       step_seconds=step)  # fmt: skip
    return ReplicaView(load, up_s, starting)


def test_cold_samples_are_ignored():
    scaler = Autoscaler(OPTIONS)
    # Just started: its first steps were slow and its fit says so; nothing is decided from it.
    cold = [view(0, 10, up_s=3.0, step=2.0)]
    assert [scaler.decide(t, cold).action for t in (0, 2, 4)] == ["hold"] * 3
    # A warm replica beside it: the prediction comes from the warm one's costs, over both replicas' load.
    mixed = [view(0, 10, up_s=60.0), view(1, 10, up_s=3.0, step=2.0)]
    d = scaler.decide(6, mixed)
    assert d.action == "hold" and d.tpot == pytest.approx(0.02 + 10 * 0.004)


def test_up_needs_consecutive_looks_and_counts_starting_replicas():
    scaler = Autoscaler(OPTIONS)
    hot = [view(0, 25)]  # TPOT 0.12 predicted: over 0.8 x 0.1
    assert scaler.decide(0, hot).action == "hold"
    d = scaler.decide(2, hot)
    assert d.action == "up" and "tpot" in d.reason
    # The new replica is starting: the same load over two is within the SLO share, so no second start.
    assert scaler.decide(4, [view(0, 25), view(1, 0, up_s=0.0, starting=True)]).action == "hold"
    assert scaler.decide(6, [view(0, 25), view(1, 0, up_s=0.0, starting=True)]).action == "hold"


def test_down_only_when_the_survivors_absorb_the_load():
    scaler = Autoscaler(OPTIONS)
    # 16 sequences over 2: TPOT 0.052 now, 0.084 on one replica (over 0.5 x 0.1): hold, for as long as it lasts.
    busy = [view(0, 8), view(1, 8)]
    assert {scaler.decide(t, busy).action for t in range(0, 200, 2)} == {"hold"}
    # 4 sequences from t = 200 s: once the slow moving average (15 s) has come down to where one replica would run
    # under 0.05 s (7.5 sequences, about 18 s later), and 30 s after that, the least busy replica goes.
    light = [view(0, 3), view(1, 1)]
    actions = [(t, scaler.decide(t, light)) for t in range(200, 300, 2)]
    downs = [(t, d) for t, d in actions if d.action == "down"]
    assert downs and 246 <= downs[0][0] <= 254 and downs[0][1].replica == 1
    # Never below the minimum.
    assert {Autoscaler(OPTIONS).decide(t, [view(0, 0)]).action for t in range(0, 100, 2)} == {"hold"}


def test_arrivals_forecast_a_surge_before_the_sequences_pile_up():
    # Two sequences running (TPOT 0.028 s predicted from them), 32 output tokens per request. At 12 requests/s one
    # replica would decode 12 x 32 x 0.004 = 1.5 s of sequence time per second: more than it has, so the forecast
    # says up on its second look at the rate; at 2 requests/s it settles near 2 sequences and holds.
    for rate in (12, 2):
        scaler, traffic, actions = Autoscaler(OPTIONS), Traffic(), []
        for _ in range(4):
            traffic.finish(32)
        for t in range(0, 10, 2):
            actions.append(scaler.decide(t, [view(0, 2)], traffic))
            for _ in range(2 * rate):
                traffic.arrive(128)
        if rate == 12:
            assert [a.action for a in actions][:3] == ["hold", "hold", "up"]
            assert actions[2].reason.startswith("arrivals forecast") and actions[2].tpot == math.inf
        else:
            # 0.028 s, stretched by the prompts' 10 % of the replica's time: 0.031 s.
            assert {a.action for a in actions} == {"hold"} and max(a.tpot or 0.0 for a in actions) < 0.032
    # Without the arrivals, the same views hold: two sequences are nothing to scale for.
    scaler = Autoscaler(OPTIONS)
    assert {scaler.decide(t, [view(0, 2)]).action for t in range(0, 10, 2)} == {"hold"}
    # Siblings of one prompt share its prefill: the prompt tokens per request are the prefill's share.
    traffic = Traffic()
    traffic.arrive(300, n=3)
    assert traffic.arrived == 3 and traffic.prompt_tokens == 100


def test_bounds():
    scaler = Autoscaler(AutoscaleOptions(min_replicas=2, max_replicas=2, slo_ttft=1.0, slo_tpot=0.1))
    assert scaler.decide(0, [view(0, 0)]).action == "up"  # below the minimum
    full = [view(0, 40), view(1, 40)]
    assert {scaler.decide(t, full).reason for t in (2, 4, 6)} == {"at the maximum"}
    with pytest.raises(ValueError):
        AutoscaleOptions(min_replicas=3, max_replicas=2)
    with pytest.raises(ValueError):
        AutoscaleOptions(up_at=0.4, down_at=0.5)
