"""Workloads and load shapes: lengths, shared prefixes, sessions, traces, gamma arrivals — exact where possible."""

from __future__ import annotations

import json
import random
import statistics

import pytest

from tokenfab.bench import workloads as wl
from tokenfab.bench.load import LoadPlan, _gap
from tokenfab.models.loading import load_tokenizer, resolve_model


@pytest.fixture(scope="module")
def tokenizer(tiny_model):
    return load_tokenizer(resolve_model(str(tiny_model("llama"))))


def test_random_lengths_are_uniform_in_the_stated_band(tokenizer):
    specs = wl.random_workload(tokenizer, isl=100, osl=20, n=200, seed=1)
    assert all(80 <= s.prompt_tokens <= 100 for s in specs)
    assert all(16 <= s.max_tokens <= 20 for s in specs)
    assert all(len(tokenizer.encode(s.prompt, add_special_tokens=False)) == s.prompt_tokens for s in specs)
    assert len({s.prompt for s in specs}) == 200  # distinct prompts: no accidental prefix-cache hits
    assert wl.random_workload(tokenizer, 100, 20, 5, seed=1) == specs[:5]  # deterministic in the seed


def test_prefix_workload_shares_exactly_k_prefixes(tokenizer):
    specs = wl.prefix_workload(tokenizer, num_prefixes=3, prefix_len=40, suffix_len=10, osl=8, n=9, seed=2)
    heads = [s.prompt.split(" ")[:40] for s in specs]
    assert heads[0] == heads[3] == heads[6] and heads[0] != heads[1]
    assert [s.session for s in specs[:4]] == ["prefix-0", "prefix-1", "prefix-2", "prefix-0"]


def test_agentic_sessions_and_trace(tokenizer, tmp_path):
    sessions = wl.agentic_sessions(tokenizer, sessions=2, turns=3, system_len=30, tool_len=10, reply_len=5,
                                   think_time_s=0.25, seed=3)
    assert [len(s.tool_outputs) for s in sessions] == [3, 3] and sessions[0].think_time_s == 0.25
    assert all(4 <= r <= 5 for s in sessions for r in s.reply_tokens)
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps(r) for r in [
        {"timestamp": 100.0, "input": "w5 w6 w7", "output_length": 4, "session_id": "a"},
        {"timestamp": 100.5, "input_length": 12, "output_length": 2},
    ]))
    specs = wl.trace_workload(trace, tokenizer)
    assert [s.arrival for s in specs] == [0.0, 0.5] and [s.max_tokens for s in specs] == [4, 2]
    assert specs[0].prompt_tokens == 3 and specs[1].prompt_tokens == 12 and specs[0].session == "a"
    (tmp_path / "bad.jsonl").write_text('{"timestamp": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        wl.trace_workload(tmp_path / "bad.jsonl", tokenizer)


def test_gamma_arrivals_have_the_asked_rate_and_burstiness():
    rng = random.Random(0)
    poisson = [_gap(rng, LoadPlan(rate=10.0), 100.0) for _ in range(20000)]
    bursty = [_gap(rng, LoadPlan(rate=10.0, burstiness=0.25), 100.0) for _ in range(20000)]
    assert statistics.mean(poisson) == pytest.approx(0.1, rel=0.03)
    assert statistics.mean(bursty) == pytest.approx(0.1, rel=0.05)
    # Coefficient of variation of gamma(k) gaps is 1/sqrt(k): 1 for Poisson, 2 for k = 0.25.
    assert statistics.pstdev(poisson) / statistics.mean(poisson) == pytest.approx(1.0, rel=0.05)
    assert statistics.pstdev(bursty) / statistics.mean(bursty) == pytest.approx(2.0, rel=0.08)
    ramp = LoadPlan(rate=10.0, ramp_up_s=10.0)
    early = statistics.mean(_gap(rng, ramp, 1.0) for _ in range(5000))
    assert early == pytest.approx(1.0, rel=0.05)  # at 1 s of a 10 s ramp the rate is 1/s


def test_load_plan_validation():
    with pytest.raises(ValueError, match="exactly one"):
        LoadPlan()
    with pytest.raises(ValueError, match="exactly one"):
        LoadPlan(concurrency=2, rate=1.0)
    with pytest.raises(ValueError, match="burstiness"):
        LoadPlan(rate=1.0, burstiness=0)
