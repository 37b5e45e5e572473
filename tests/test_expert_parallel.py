"""Expert parallelism over two engine processes (gloo): a MoE model's experts split between the ranks gives exactly
the single engine's tokens (greedy and seeded, mixed batches), also while EPLB moves experts mid-run; offline
(`LLM(data_parallel_size=2, expert_parallel=True)`) and served (`serve --data-parallel-size 2 --expert-parallel`)."""

import time

import httpx
import pytest

from conftest import random_prompts, tiny_llm
from live_server import LiveServer
from tokenfab import LLM, SamplingParams

PROMPTS = random_prompts([5, 40, 100, 17, 70, 33], seed=1)
PARAMS = [SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)] * 4 + [
    SamplingParams(max_tokens=12, temperature=0.9, seed=5, ignore_eos=True)
] * 2
OPTIONS = dict(dtype="float32", kv_cache_memory_gb=0.04, max_num_batched_tokens=64)


def tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def single(tiny_model):
    """kind -> the single engine's tokens for PROMPTS."""
    cache = {}

    def get(kind):
        if kind not in cache:
            cache[kind] = tokens(tiny_llm(tiny_model(kind), **OPTIONS).generate(PROMPTS, PARAMS))
        return cache[kind]

    return get


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral", "deepseek_v3"])
def test_two_expert_parallel_ranks_give_the_single_engine_tokens(kind, tiny_model, single):
    llm = LLM(str(tiny_model(kind)), data_parallel_size=2, expert_parallel=True, **OPTIONS)
    try:
        assert tokens(llm.generate(PROMPTS, PARAMS)) == single(kind)
        moe = llm.engine.stats().moe
        assert len(moe.rank_tokens) == 2 and all(n > 0 for n in moe.rank_tokens)  # both ranks' experts worked
        assert moe.rebalances == 0
    finally:
        llm.close()


def test_eplb_moving_experts_mid_run_changes_no_output(tiny_model, single):
    """Every 4 steps the ranks rebalance 8 experts + 2 copies from the load they measured (DeepSeek-V3 routing)."""
    llm = LLM(str(tiny_model("deepseek_v3")), data_parallel_size=2, expert_parallel=True, eplb=True,
              num_redundant_experts=2, eplb_interval_steps=4, **OPTIONS)
    try:
        assert tokens(llm.generate(PROMPTS, PARAMS)) == single("deepseek_v3")
        assert llm.engine.stats().moe.rebalances >= 2
        assert tokens(llm.generate(PROMPTS[:2], PARAMS[:2])) == single("deepseek_v3")[:2]  # and after them
    finally:
        llm.close()


def test_served_expert_parallel_ranks(tiny_model, single):
    server = LiveServer(tiny_model("qwen3_moe"), "--data-parallel-size", "2", "--expert-parallel", "--dtype",
                        "float32", "--max-num-batched-tokens", "64")
    try:
        for prompt, want in zip(PROMPTS[:3], single("qwen3_moe")[:3]):
            r = httpx.post(f"{server.url}/v1/completions", timeout=60,
                           json={"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
            assert r.status_code == 200
            assert r.json()["choices"][0]["text"] == " ".join(f"w{t}" for t in want)  # tiny vocabulary: w<id>
        replicas = httpx.get(f"{server.url}/replicas").json()["replicas"]
        assert [r["state"] for r in replicas] == ["running", "running"]
        deadline = time.monotonic() + 10
        while True:  # each rank's stats of the last step arrive on their own
            m = server.metrics()
            ranks = [m[f'tokenfab:moe_rank_tokens_total{{model_name="tiny",rank="{i}"}}'] for i in (0, 1)]
            routed = sum(v for k, v in m.items() if k.startswith("tokenfab:moe_expert_tokens_total{"))
            if routed == sum(ranks) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert all(n > 0 for n in ranks)
        assert routed == sum(ranks)  # every pair routed was computed by one rank
        assert m['tokenfab:moe_all_to_all_seconds_total{model_name="tiny"}'] > 0
        assert 0 < m['tokenfab:moe_all_to_all_share{model_name="tiny"}'] < 1
    finally:
        assert server.stop() == 0


def test_bad_expert_parallel_options_are_refused(tiny_model):
    with pytest.raises(ValueError, match="eplb .* needs expert_parallel"):
        LLM(str(tiny_model("qwen3_moe")), eplb=True)
    with pytest.raises(ValueError, match="multiple of the ranks"):
        LLM(str(tiny_model("qwen3_moe")), data_parallel_size=2, expert_parallel=True, num_redundant_experts=1,
            **OPTIONS)


def test_a_killed_rank_takes_its_group_down_and_back_without_losing_a_request(tiny_model):
    """kill -9 of one rank with sequences in flight on both: the other fails at its next exchange, both restart and
    rendezvous again, and every request completes with the single engine's tokens (migrated where they were)."""
    import os
    import signal
    from concurrent.futures import ThreadPoolExecutor

    from tokenfab.bench.faults import busiest

    path = tiny_model("qwen3_moe")
    prompts = random_prompts([30, 12, 50, 25, 40, 9], seed=8)
    params = SamplingParams(max_tokens=300, temperature=0, ignore_eos=True)
    want = tokens(tiny_llm(path, **OPTIONS).generate(prompts, params))
    server = LiveServer(path, "--data-parallel-size", "2", "--expert-parallel", "--dtype", "float32")
    try:
        def one(prompt):
            r = httpx.post(f"{server.url}/v1/completions", timeout=300,
                           json={"prompt": prompt, "max_tokens": 300, "temperature": 0, "ignore_eos": True})
            return r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text

        with ThreadPoolExecutor(len(prompts)) as pool:
            futures = [pool.submit(one, p) for p in prompts]
            victim = busiest(server.url, {0, 1}, freeze=True)
            os.kill(victim["pid"], signal.SIGKILL)
            results = [f.result() for f in futures]
        assert [s for s, _ in results] == [200] * len(prompts), results
        assert [t for _, t in results] == [" ".join(f"w{i}" for i in w) for w in want]
        rows = httpx.get(f"{server.url}/replicas").json()["replicas"]
        assert [r["state"] for r in rows] == ["running", "running"] and all(r["restarts"] == 1 for r in rows)
        m = server.metrics()
        assert m.get('tokenfab:router_migrations_total{cause="lost",model_name="tiny"}', 0) == 0
        assert m['tokenfab:router_migrations_total{cause="parked",model_name="tiny"}'] > 0  # waited, then moved
    finally:
        assert server.stop() == 0


def test_expert_parallel_ranks_on_two_ray_nodes(tiny_model, single):
    """The ranks as Ray actors on a simulated two-node cluster (two raylets here, one CPU each): they meet at the
    rendezvous on bundle 0's node and give the single engine's tokens."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        server = LiveServer(tiny_model("qwen3_moe"), "--data-parallel-size", "2", "--expert-parallel", "--ray",
                            "--ray-address", cluster.address, "--dtype", "float32", "--max-num-batched-tokens", "64",
                            startup_timeout=300)
        try:
            texts = []
            for prompt in PROMPTS[:4]:
                r = httpx.post(f"{server.url}/v1/completions", timeout=120,
                               json={"prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True})
                texts.append(r.json()["choices"][0]["text"])
            rows = httpx.get(f"{server.url}/replicas").json()["replicas"]
            m = server.metrics()
        finally:
            assert server.stop() == 0
    finally:
        cluster.shutdown()
    assert texts == [" ".join(f"w{t}" for t in want) for want in single("qwen3_moe")[:4]]
    assert len({r["ray_node_id"] for r in rows}) == 2  # one rank per node
    assert all(m[f'tokenfab:moe_rank_tokens_total{{model_name="tiny",rank="{i}"}}'] > 0 for i in (0, 1))
