"""The simulator: it makes the real engine's scheduling decisions (same batches, same preemptions) when fed the real
run's step times; the step-cost fit recovers a known model; routing policies behave in it as in the router; and
`tokenfab simulate` writes the report `tokenfab bench serve` writes."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time

import pytest

from tokenfab.bench.stats import Summary
from tokenfab.cluster.policies import make_policy
from tokenfab.config import EngineConfig
from tokenfab.engine.core import EngineCore
from tokenfab.engine.messages import CoreRequest
from tokenfab.engine.types import SamplingParams
from tokenfab.sim.simulator import ReplicaShape, SessionTokens, Simulator, SimRequest, sessions_loop
from tokenfab.sim.step_cost import FEATURES, StepCostModel, StepFeatures
from tokenfab.bench.records import RequestRecord


class Replayed(StepCostModel):
    """The recorded step times, in order."""

    def __init__(self, times: list[float]) -> None:
        super().__init__(dict.fromkeys(FEATURES, 0.0))
        self.times = list(times)

    def predict(self, f: StepFeatures) -> float:
        return self.times.pop(0) if self.times else 1.0


def rows(plan) -> tuple:
    return (tuple((s.request.request_id, s.start, s.num_tokens) for s in plan.scheduled),
            tuple(r.request_id for r in plan.preempted))


def test_the_simulator_makes_the_engines_scheduling_decisions(tiny_model):
    """A real engine (tiny model, a pool small enough to preempt, a 48-token step budget) with requests arriving
    between steps; the simulator, given the same arrivals and the recorded step times, plans identical steps."""
    config = EngineConfig(model=str(tiny_model("gemma3")), dtype="float32", num_threads=1, block_size=8,
                          kv_cache_memory_gb=0.00035, max_model_len=128, max_num_batched_tokens=48, max_num_seqs=6)
    core = EngineCore(config)
    plans, times = [], []
    core.scheduler.hooks.append(lambda u: plans.append(rows(u.plan)))
    rng = random.Random(5)
    arrivals = {0: 3, 2: 2, 5: 4, 9: 1, 14: 3}  # step number -> requests added before it
    specs = []
    step = 0
    while True:
        for _ in range(arrivals.get(step, 0)):
            prompt = [rng.randrange(20, 500) for _ in range(rng.randrange(10, 90))]
            specs.append((f"q{len(specs)}", prompt, rng.randrange(2, 30), sum(times)))
            rid, _, max_tokens, _ = specs[-1]
            core.add_request(CoreRequest(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0,
                                                                     ignore_eos=True), time.monotonic()))
        if not core.has_unfinished() and step > max(arrivals):
            break
        started, planned = time.perf_counter(), len(plans)
        core.step()
        if len(plans) > planned:  # an idle engine (waiting for the next arrival) takes no step
            times.append(time.perf_counter() - started)
        step += 1
    assert any(preempted for _, preempted in plans), "the pool was meant to preempt"

    shape = ReplicaShape(list(core.kv.windows), [p.num_blocks for p in core.kv.pools], config.block_size,
                         config.max_num_seqs, config.max_num_batched_tokens, core.max_model_len)
    sim = Simulator(shape, Replayed(times))
    sim.replicas[0].record_steps = True
    for rid, prompt, max_tokens, at in specs:
        sim.at(at, lambda rid=rid, prompt=prompt, m=max_tokens: sim.submit(
            SimRequest(rid, prompt, m, RequestRecord(0.0, 0.0, len(prompt)))))
    sim.run()
    assert [rows(plan) for _, plan in sim.replicas[0].steps] == plans
    assert len(sim.records) == len(specs)
    assert sim.now == pytest.approx(sum(times))


def test_the_fit_recovers_a_known_step_cost():
    truth = {"overhead": 0.02, "prefill_tokens": 4e-4, "prefill_attention": 1e-4, "decode_seqs": 1e-3,
             "decode_context": 2e-6}
    rng = random.Random(0)
    samples = []
    for _ in range(200):
        f = StepFeatures(rng.randrange(0, 512), rng.uniform(0, 300), rng.randrange(0, 32), rng.randrange(0, 30000))
        t = sum(truth[k] * x for k, x in zip(FEATURES, f.row()))
        samples.append((f, t * rng.uniform(0.98, 1.02)))
    model = StepCostModel.fit(samples, {"note": "synthetic"})
    for k in FEATURES:
        assert model.coef[k] == pytest.approx(truth[k], rel=0.1)
    assert model.meta["median_rel_error"] < 0.02
    # A feature with no effect is fitted as zero, never negative.
    flat = StepCostModel.fit([(StepFeatures(n, 0.0, 0, 0), 0.01 + 1e-4 * n) for n in range(0, 400, 10)])
    assert all(c >= 0 for c in flat.coef.values())


def test_kv_routing_in_the_simulator_keeps_sessions_where_their_prefix_is():
    cost = StepCostModel({"overhead": 0.01, "prefill_tokens": 5e-4, "prefill_attention": 0.0, "decode_seqs": 2e-3,
                          "decode_context": 0.0})
    shape = ReplicaShape([None], [400], 16, 16, 256, 4096)
    rng = random.Random(1)
    sessions = [SessionTokens(f"s{i}", [rng.randrange(20, 900) for _ in range(200)],
                              [[rng.randrange(20, 900) for _ in range(40)] for _ in range(4)], [16] * 4, 0.5)
                for i in range(12)]
    hit = {}
    for policy in ("round-robin", "kv"):
        sim = Simulator(shape, cost, 2, make_policy(policy, seed=0))
        sessions_loop(sim, sessions, 6)
        sim.run()
        records = sim.records
        assert len(records) == 48 and all(r.output_tokens == 16 for r in records)
        later = [r for r in records if r.turn > 0]
        hit[policy] = sum(r.cached_tokens for r in later) / sum(r.prompt_tokens for r in later)
    assert hit["kv"] > 0.8 > hit["round-robin"] + 0.2


def test_tokenfab_simulate_writes_the_bench_report(tiny_model, tmp_path):
    profile = tmp_path / "prof"
    cost = StepCostModel({"overhead": 0.005, "prefill_tokens": 2e-4, "prefill_attention": 0.0, "decode_seqs": 1e-3,
                          "decode_context": 1e-7},
                         {"shape": {"windows": [None], "blocks_per_group": [300], "block_size": 16,
                                    "max_num_seqs": 16, "max_num_batched_tokens": 256, "max_model_len": 512},
                          "usd_per_hour": 0.09})
    cost.save(profile)
    out = tmp_path / "sim.json"
    started = time.monotonic()
    subprocess.run([sys.executable, "-m", "tokenfab.cli", "simulate", "--profile", str(profile), "--model",
                    str(tiny_model("llama")), "--workload", "random", "--isl", "100", "--osl", "20",
                    "--concurrency", "4", "--num-requests", "40", "--out", str(out)], check=True, capture_output=True)
    assert time.monotonic() - started < 60
    doc = json.loads(out.read_text())
    assert doc["kind"] == "tokenfab-simulate" and doc["simulated"]["replicas"] == 1
    point = doc["systems"][0]["points"][0]
    assert set(point["summary"]) == set(Summary.__dataclass_fields__)
    s = point["summary"]
    assert s["completed"] == s["sent"] == 40 and 640 <= s["output_tokens"] <= 800  # osl: uniform in [0.8, 1] x 20
    # 4 at a time, each step ~5 ms + 1 ms per decoding sequence: a TPOT of about 9 ms.
    assert 0.007 < s["tpot_s"]["p50"] < 0.012
    assert s["output_tok_s"] == pytest.approx(s["output_tokens"] / s["duration_s"])
