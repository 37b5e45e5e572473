"""Routing policies without engines: which replica each picks for given loads and cached prefixes."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest

from tokenfab.cluster.policies import KvAware, LeastLoad, Prefix, ReplicaLoad, RoundRobin, make_policy
from tokenfab.cluster.pool import replica_configs, replica_pricing
from tokenfab.cluster.replica import StepCost
from tokenfab.config import EngineConfig, PricingConfig
from tokenfab.serve.settings import ServerSettings, replica_count


def loads(*rows: tuple[int, int, int]) -> list[ReplicaLoad]:
    """(running, queued prefill tokens, cached blocks) per replica."""
    return [ReplicaLoad(i, running, queued, cached) for i, (running, queued, cached) in enumerate(rows)]


def test_kv_prefers_the_replica_holding_the_prefix():
    policy = KvAware(random.Random(0))
    decision = policy.choose(list(range(20)), 330, 16, loads((2, 0, 0), (2, 0, 18)))
    assert decision.replica == 1 and "18 blocks cached" in decision.reason
    assert decision.predicted_ttft == pytest.approx((330 - 18 * 16) / 2000 + 2 * 0.002)


def test_kv_does_not_herd_onto_a_busy_cached_replica():
    """The replica with the prompt cached has 2,000 prefill tokens queued: recomputing elsewhere is faster."""
    policy = KvAware(random.Random(0))
    assert policy.choose(list(range(20)), 330, 16, loads((8, 2000, 18), (1, 0, 0))).replica == 1


def test_kv_picks_the_cheapest_replica_within_the_slo():
    policy = KvAware(random.Random(0), slo_ttft=0.5)
    replicas = loads((0, 0, 0), (0, 0, 0))
    replicas[0].usd_per_hour, replicas[1].usd_per_hour = 2.0, 0.5
    replicas[1].prefill_tokens_per_s = 1000  # slower, cheaper, still within the SLO for 330 tokens
    decision = policy.choose([], 330, 16, replicas)
    assert decision.replica == 1 and decision.reason.startswith("cheapest within the SLO")
    replicas[1].prefill_tokens_per_s = 100  # now too slow for the SLO: the fastest wins
    assert policy.choose([], 330, 16, replicas).replica == 0


def test_ties_go_to_the_least_loaded_then_at_random():
    policy = KvAware(random.Random(0))
    picks = {policy.choose([], 100, 16, loads((0, 0, 0), (0, 0, 0), (0, 0, 0))).replica for _ in range(60)}
    assert picks == {0, 1, 2}
    assert LeastLoad(random.Random(0)).choose([], 100, 16, loads((3, 0, 0), (1, 50, 0), (1, 10, 0))).replica == 2


def test_round_robin_takes_turns():
    policy = RoundRobin(random.Random(0))
    assert [policy.choose([], 1, 16, loads((9, 0, 0), (0, 0, 0))).replica for _ in range(4)] == [0, 1, 0, 1]


def test_prefix_follows_what_it_sent_unless_that_replica_is_much_busier():
    policy = Prefix(random.Random(0))
    policy.sent(1, [10, 11, 12])
    assert policy.choose([10, 11, 99], 48, 16, loads((0, 0, 0), (1, 0, 0))).replica == 1
    assert policy.choose([10, 11, 99], 48, 16, loads((0, 0, 0), (9, 0, 0))).replica == 0  # too busy
    assert policy.choose([77], 48, 16, loads((2, 0, 0), (1, 0, 0))).reason == "no match: load"


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError, match="unknown router policy"):
        make_policy("fastest")


def test_step_cost_separates_a_steps_overhead_from_its_tokens():
    """Decode steps (few tokens, mostly fixed time) do not make prefill look slow: the per-token cost comes from
    steps whose sizes differ, and holds through a long run of alike steps."""
    cost = StepCost()
    rng = random.Random(1)
    for _ in range(40):
        tokens = rng.choice([1, 4, 300, 900])
        cost.observe(1, tokens, 0.05 + tokens * 0.0004)
    assert cost.per_token == pytest.approx(0.0004, rel=0.02) and cost.overhead == pytest.approx(0.05, rel=0.05)
    for _ in range(300):
        cost.observe(1, 1, 0.056)  # a long run of batch-1 decodes
    assert cost.per_token == pytest.approx(0.0004, rel=0.05) and cost.overhead == pytest.approx(0.056, rel=0.05)
    cost.observe(0, 0, 0.0)  # no step: nothing learned
    assert cost.per_token == pytest.approx(0.0004, rel=0.05)


def test_step_cost_tells_a_decoding_sequence_from_a_prompt_token():
    """A decode token costs more than a prompt token (it carries a sequence's share of the LM head and its own
    attention): from steps mixing prefill chunks and decodes the fit tells them apart, and a long run of decodes at
    one batch size keeps both."""
    cost = StepCost()
    rng = random.Random(2)
    for _ in range(200):
        prompt, seqs = rng.choice([0, 0, 128, 512]), rng.randint(1, 16)
        cost.observe(1, prompt + seqs, 0.008 + prompt * 0.0015 + seqs * 0.0045, prompt_tokens=prompt)
    assert cost.per_token == pytest.approx(0.0015, rel=0.02) and cost.per_seq == pytest.approx(0.0045, rel=0.02)
    assert cost.overhead == pytest.approx(0.008, rel=0.05)
    for _ in range(300):
        cost.observe(1, 8, 0.008 + 8 * 0.0045, prompt_tokens=0)  # eight sequences decoding, nothing else
    assert cost.per_token == pytest.approx(0.0015, rel=0.05) and cost.per_seq == pytest.approx(0.0045, rel=0.05)
    # Several steps in one report: their means.
    cost.observe(4, 4 * 200, 4 * (0.008 + 192 * 0.0015 + 8 * 0.0045), prompt_tokens=4 * 192)
    assert cost.per_seq == pytest.approx(0.0045, rel=0.05)


def test_kv_keeps_a_cheap_replica_whose_decode_would_miss_the_tpot_slo_out():
    """The cheaper replica runs 6 sequences: its next decode step (with this one) is 0.002 + 7 x 0.002 s, past a
    10 ms TPOT SLO, so the dearer idle one wins; with a looser SLO the cheap one does."""
    replicas = loads((6, 0, 0), (0, 0, 0))
    for r in replicas:
        r.step_seconds = 0.002
    replicas[0].usd_per_hour, replicas[1].usd_per_hour = 0.5, 2.0
    assert KvAware(random.Random(0), slo_tpot=0.01).choose([], 100, 16, replicas).replica == 1
    assert KvAware(random.Random(0), slo_tpot=0.05).choose([], 100, 16, replicas).replica == 0
    assert make_policy("kv", slo_ttft=1.0, slo_tpot=0.01).choose([], 100, 16, replicas).replica == 1


def test_the_ladder_has_replica_rungs_round_robin_then_kv():
    from tokenfab.bench.ladder import rungs

    *before, rr, kv, _ = rungs((1, 4), "none", replicas=2)  # the last: disaggregation (test_disagg_router)
    assert before == rungs((1, 4))
    assert rr.flags == (*before[-1].flags, "--replicas", "2", "--router", "round-robin")
    assert kv.flags == (*before[-1].flags, "--replicas", "2", "--router", "kv")


def test_replica_prices_set_each_replicas_pricing():
    base = PricingConfig(usd_per_hour=0.05, idle_watts=2.0)
    pricing = replica_pricing(base, 3, ["0=h100", "2=0.01"])
    assert pricing[0].profile == "h100" and pricing[0].usd_per_hour is None and pricing[0].idle_watts is None
    assert pricing[1] == base
    assert pricing[2] == dataclasses.replace(base, usd_per_hour=0.01)
    configs = replica_configs(EngineConfig(model="unused", num_threads=2), 2, ["1=l4"])
    assert [c.pricing.profile for c in configs] == [None, "l4"]


@pytest.mark.parametrize(
    ("specs", "message"),
    [
        (["3=1.0"], "there are 2 replicas"),
        (["1"], "expected ID=USD_PER_HOUR or ID=PROFILE"),
        (["x=1"], "expected ID=USD_PER_HOUR or ID=PROFILE"),
        (["0=1", "0=2"], "priced twice"),
        (["0=-1"], "finite and >= 0"),
        (["0=inf"], "finite and >= 0"),
        (["1=tpu9"], "unknown price profile 'tpu9'"),
    ],
)
def test_bad_replica_prices_are_refused_before_anything_starts(specs, message):
    with pytest.raises(ValueError, match=message):
        replica_pricing(PricingConfig(), 2, specs)


def test_the_server_refuses_replica_prices_it_cannot_apply():
    with pytest.raises(ValueError, match="needs --replicas 2"):
        ServerSettings(replica_price=("0=1",))
    with pytest.raises(ValueError, match="there are 2 replicas"):
        ServerSettings(replicas=2, replica_price=("2=1",))


def test_replicas_auto_needs_its_slo_and_sane_bounds():
    settings = ServerSettings(replicas=replica_count("auto"), max_replicas=3, slo_ttft=2.0, slo_tpot=0.1)
    options = settings.autoscale_options()
    assert settings.autoscale and settings.replica_slots == 3
    assert options is not None and (options.min_replicas, options.max_replicas) == (1, 3)
    assert ServerSettings(replicas=replica_count("2")).autoscale_options() is None
    with pytest.raises(ValueError, match="give --slo-ttft and --slo-tpot"):
        ServerSettings(replicas="auto", slo_ttft=2.0)
    with pytest.raises(ValueError, match="--max-replicas >= 2"):
        ServerSettings(replicas="auto", max_replicas=1, slo_ttft=2.0, slo_tpot=0.1)
    with pytest.raises(ValueError, match="a number of replicas or auto"):
        replica_count("many")


def test_step_costs_start_from_a_profile(tmp_path):
    """--step-profile: each replica's fit starts from the profile's measured terms (what a decoding sequence costs
    is known before a light load's one-at-a-time decodes could tell it), and a directory without one is refused."""
    coef = {"overhead": 0.0078, "prefill_tokens": 0.0015, "prefill_attention": 7e-4, "decode_seqs": 0.0046}
    (tmp_path / "step_cost.json").write_text(json.dumps({"coef": coef}))
    prior = StepCost.measured(str(tmp_path))
    assert prior == (0.0078, 0.0015, 0.0046)
    cost = StepCost(*prior)
    for _ in range(100):
        cost.observe(1, 1, 0.0078 + 0.0046, prompt_tokens=0)  # one decode at a time: nothing tells the terms apart
    assert cost.per_seq == pytest.approx(0.0046, rel=0.02) and cost.per_token == pytest.approx(0.0015, rel=0.02)
    assert ServerSettings(step_profile=str(tmp_path)).step_profile == str(tmp_path)
    with pytest.raises(ValueError, match="no step_cost.json"):
        ServerSettings(step_profile=str(tmp_path / "missing"))
