"""The planner finds the cheapest deployment meeting the SLO on synthetic step costs whose answer is known: a variant
that never meets the TPOT SLO is never chosen, a cheap one needs two replicas where an expensive one needs one, and
which wins follows the prices. GPU step costs come from the roofline, labelled modelled; `tokenfab plan` writes a
plan with the serve command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tokenfab.bench.records import SLO
from tokenfab.bench.sweep import SweepConfig, Workload
from tokenfab.models.arch import arch_from_hf_config
from tokenfab.sim.planner import Variant, evaluate, search
from tokenfab.sim.roofline import GPUS, roofline_cost, roofline_shape
from tokenfab.sim.run import SimLoad
from tokenfab.sim.simulator import ReplicaShape
from tokenfab.sim.step_cost import StepCostModel, StepFeatures

SHAPE = ReplicaShape([None], [2000], 16, 64, 512, 1024)


def cost(overhead: float, per_seq: float) -> StepCostModel:
    return StepCostModel({"overhead": overhead, "prefill_tokens": 5e-4, "prefill_attention": 0.0,
                          "decode_seqs": per_seq, "decode_context": 0.0})  # fmt: skip


def variant(name: str, overhead: float, per_seq: float, usd: float) -> Variant:
    return Variant(name, cost(overhead, per_seq), SHAPE, usd, ("--threads", "1"), batch_limits=(64,))


# At 8 requests/s, each 16 tokens out, evenly spaced: `small` (20 ms + 10 ms per sequence a step) is unstable on one
# replica (each request adds 16 x 10 ms of step time to every second: 1.28 s/s) and runs about 3.6 sequences at a
# 56 ms TPOT per replica on two; `big` runs about 1.5 at 12 ms on one; `slow` never steps under 200 ms.
SMALL, BIG, SLOW = (0.02, 0.01), (0.01, 0.001), (0.2, 0.001)


@pytest.fixture(scope="module")
def load() -> SimLoad:
    n, rate = 80, 8.0
    config = SweepConfig([rate], True, n, 0, slo=SLO(1.0, 0.1))
    requests = [([1000 + (i * 37 + j) % 5000 for j in range(32)], 16) for i in range(n)]
    return SimLoad(config, Workload("synthetic", {}), rate, True, requests, [i / rate for i in range(n)])


def test_the_known_capacities_hold_in_the_simulator(load):
    assert not evaluate(load, variant("small", *SMALL, 1.0), 1, 64).meets_slo
    two = evaluate(load, variant("small", *SMALL, 1.0), 2, 64)
    assert two.meets_slo and 0.04 < two.tpot_p50_s < 0.08
    assert evaluate(load, variant("big", *BIG, 3.0), 1, 64).meets_slo
    assert not any(evaluate(load, variant("slow", *SLOW, 0.1), k, 64).meets_slo for k in (1, 4))


@pytest.mark.parametrize("big_price,best", [(3.0, ("small", 2)), (1.5, ("big", 1))])
def test_the_cheapest_deployment_meeting_the_slo_wins(load, big_price, best):
    plan = search(load, [variant("slow", *SLOW, 0.1), variant("small", *SMALL, 1.0), variant("big", *BIG, big_price)],
                  max_replicas=4)  # fmt: skip
    assert plan.best is not None and (plan.best.variant, plan.best.replicas) == best
    assert plan.best.usd_per_hour == pytest.approx(min(2 * 1.0, big_price))
    assert all(c.variant != "slow" for c in [plan.best, *plan.runners_up])
    # The runner-up is the other variant's cheapest deployment meeting the SLO.
    other = ("big", 1) if best[0] == "small" else ("small", 2)
    assert (plan.runners_up[0].variant, plan.runners_up[0].replicas) == other
    # Per-replica threads (1) times the replicas: `serve --replicas` splits the total back.
    assert plan.best.serve_command.startswith(f"tokenfab serve --threads {best[1]} --max-num-seqs 64")
    if best[1] > 1:
        assert "--replicas 2 --router kv --slo-ttft 1 --slo-tpot 0.1" in plan.best.serve_command
    # Open loop: a variant's search stops one replica count past its first success.
    assert max(c.replicas for c in plan.candidates if c.variant == "small") == 3
    # The frontier holds no point that another beats on both cost and TTFT p90.
    for a in plan.frontier:
        assert not any(b.usd_per_mtok_output < a.usd_per_mtok_output and b.ttft_p90_s < a.ttft_p90_s
                       for b in plan.candidates if b.usd_per_mtok_output is not None)  # fmt: skip


def test_no_plan_when_nothing_meets_the_slo(load):
    plan = search(load, [variant("slow", *SLOW, 0.1), variant("small", *SMALL, 1.0)], max_replicas=1)
    assert plan.best is None and not plan.runners_up and len(plan.candidates) == 2


def test_roofline_step_costs_follow_the_datasheets():
    arch = arch_from_hf_config({"model_type": "llama", "vocab_size": 32000, "hidden_size": 4096,
                                "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                                "num_key_value_heads": 8, "max_position_embeddings": 8192})  # fmt: skip
    l4, h100 = (roofline_cost(GPUS[g], arch, 1.0) for g in ("l4", "h100"))
    assert "roofline of h100" in h100.meta["modelled"]
    # An 8B model's batch-1 decode step is its weights over the bandwidth: ~16 GB / (0.7 x 3.35 TB/s) on an H100.
    step = h100.engine_seconds(StepFeatures(decode_seqs=1, decode_context=1000))
    assert 0.007 < step < 0.012
    # 11x the bandwidth, the same launches per layer.
    assert l4.engine_seconds(StepFeatures(decode_seqs=1)) > 6 * h100.engine_seconds(StepFeatures(decode_seqs=1))
    # KV: an L4 keeps ~6 GB after the weights (128 KB a token: ~2,900 blocks); an H100 has more than 256 sequences
    # of 1,024 tokens can use, so it gets that.
    l4_blocks = roofline_shape(GPUS["l4"], arch, SHAPE).blocks_per_group[0]
    assert 2000 < l4_blocks < 4000
    assert roofline_shape(GPUS["h100"], arch, SHAPE).blocks_per_group[0] == 256 * 1024 // 16


def test_tokenfab_plan_writes_the_plan(tiny_model, tmp_path):
    profile = tmp_path / "prof"
    StepCostModel(
        {"overhead": 0.005, "prefill_tokens": 2e-4, "prefill_attention": 0.0, "decode_seqs": 1e-3,
         "decode_context": 1e-7},
        {"shape": {"windows": [None], "blocks_per_group": [300], "block_size": 16, "max_num_seqs": 16,
                   "max_num_batched_tokens": 256, "max_model_len": 512},
         "usd_per_hour": 0.09, "threads": 2, "weights": "none", "kv_cache_memory_gb": 1.0},
    ).save(profile)  # fmt: skip
    out = tmp_path / "plan"
    subprocess.run([sys.executable, "-m", "tokenfab.cli", "plan", "--profile", str(profile), "--model",
                    str(tiny_model("llama")), "--devices", "h100", "--max-replicas", "2", "--workload", "random",
                    "--isl", "100", "--osl", "20", "--rate", "4", "--num-requests", "30", "--slo-ttft", "1",
                    "--slo-tpot", "0.05", "--out", str(out)], check=True, capture_output=True)  # fmt: skip
    doc = json.loads((out / "plan.json").read_text())
    assert doc["kind"] == "tokenfab-plan"
    best = doc["plan"]["best"]
    # The profiled CPU at $0.09/h meets a 50 ms TPOT at 4 req/s (steps of ~10 ms): it beats a $2.50/h H100.
    assert best["variant"].startswith("prof") and best["replicas"] == 1 and best["meets_slo"]
    assert best["serve_command"] == ("tokenfab serve --threads 2 --kv-cache-memory-gb 1 --max-num-batched-tokens 256 "
                                     "--max-num-seqs 16")
    assert any(v["modelled"] and v["name"] == "h100 (modelled)" for v in doc["variants"])
    md = (out / "plan.md").read_text()
    assert best["serve_command"] in md and "modelled" in md
    assert (out / "frontier.png").stat().st_size > 0
