"""EPLB placement (tokenfab.models.expert_parallel.rebalance): hot experts get the redundant copies, every rank the
same number of slots and no expert twice, and the measured load spreads evenly where the initial split does not."""

import pytest

from tokenfab.models.expert_parallel import Placement, rebalance


def rank_loads(load, placement):
    hosts = placement.hosts(len(load))
    out = [0.0] * len(placement.ranks)
    for e, n in enumerate(load):
        for r in hosts[e]:
            out[r] += n / len(hosts[e])
    return out


def test_initial_placement_deals_the_experts_round_the_ranks():
    assert Placement.initial(8, 2).ranks == ((0, 2, 4, 6), (1, 3, 5, 7))
    assert Placement.initial(8, 4).slots == 2
    assert Placement.initial(6, 2, redundant=2).slots == 4


def test_skewed_load_gets_copies_and_spreads_evenly():
    load = [900, 40, 30, 20, 10, 10, 5, 5, 300, 20, 10, 10, 5, 5, 5, 5]  # two hot experts
    initial = Placement(((0, 1, 2, 3), (4, 5, 6, 7), (8, 9, 10, 11), (12, 13, 14, 15)))  # contiguous shares
    before = rank_loads(load, initial)
    placement = rebalance(load, 4, 4)
    after = rank_loads(load, placement)
    assert all(len(r) == 5 for r in placement.ranks)
    assert all(len(set(r)) == len(r) for r in placement.ranks)  # no expert twice on a rank
    hosts = placement.hosts(16)
    assert len(hosts[0]) == 4 and len(hosts[8]) >= 1 and all(hosts[e] for e in range(16))
    assert max(before) / (sum(before) / 4) > 2.5  # the hottest expert's rank: 2.9x the mean
    assert max(after) / (sum(after) / 4) < 1.2  # 1.13: expert 8 (300 tokens) alone is 0.87 of the mean


def test_uniform_load_keeps_one_copy_each_and_balances():
    placement = rebalance([10.0] * 8, 2, 0)
    assert sorted(e for r in placement.ranks for e in r) == list(range(8))
    assert rank_loads([10.0] * 8, placement) == [40.0, 40.0]


@pytest.mark.parametrize("experts, ranks, redundant, message", [
    (8, 3, 0, "multiple of the ranks"),
    (4, 2, 6, "at most 4"),
])
def test_impossible_placements_are_refused(experts, ranks, redundant, message):
    with pytest.raises(ValueError, match=message):
        rebalance([1.0] * experts, ranks, redundant)


def test_the_ladder_gains_moe_rungs_ep_then_eplb_with_valid_flags():
    from tokenfab.bench.ladder import Rung, ladder_rows, rungs
    from tokenfab.cli import build_parser
    from tokenfab.config_cli import engine_config

    *_, ep, eplb = rungs((1, 4), moe_model="/models/moe")
    assert (ep.model, eplb.model) == ("/models/moe", "/models/moe") and ep.baseline and not eplb.baseline
    configs = [engine_config(build_parser().parse_args(["serve", *r.flags, "--model", r.model])) for r in (ep, eplb)]
    assert [(c.data_parallel_size, c.expert_parallel, c.eplb) for c in configs] == [(2, True, False), (2, True, True)]
    assert configs[1].num_redundant_experts == 2
    assert not rungs((1, 4))[-1].model  # without --moe-model: no MoE rungs

    def entry(tok_s):
        return {"points": [{"concurrency": 4, "summary": {
            "output_tok_s": tok_s, "ttft_s": {"p50": 0.1}, "tpot_s": {"p50": 0.01}, "goodput_fraction": 1.0}}]}

    rows = ladder_rows([(Rung("dense", (), 4), entry(100.0)), (ep, entry(10.0)), (eplb, entry(12.0))], 1.0)
    assert rows[1]["step_gain"] is None and rows[1]["compounded_gain"] == 1.0  # another model: a new baseline
    assert abs(rows[2]["step_gain"] - 1.2) < 1e-9 and abs(rows[2]["compounded_gain"] - 1.2) < 1e-9
