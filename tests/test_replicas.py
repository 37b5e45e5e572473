"""`tokenfab serve --replicas 2` (tiny model, two engine-core processes behind the router): the same greedy tokens
as one engine whichever replica serves; every response names its replica; a shared 1,000-token system prompt
across 32 sessions spreads over both replicas while each session's next turn goes where its own prefix lives; the
router's KV index equals what the replicas hold, also when it missed events."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import httpx
import openai
import pytest

from live_server import LiveServer
from tiny_models import write_tiny_model
from tokenfab import LLM, SamplingParams
from tokenfab.cluster.kv_index import KvIndex, prompt_blocks
from tokenfab.engine.engine import LLMEngine

SYSTEM = " ".join(f"w{5 + i % 400}" for i in range(1000))
"""A shared 1,000-token system prompt (62 full blocks)."""


def session_prompt(session: int, turn: int) -> str:
    own = " ".join(f"w{100 + (session * 7 + k) % 300}" for k in range(120 + 24 * turn))
    return f"{SYSTEM} {own}"


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    return write_tiny_model("llama", tmp_path_factory.mktemp("llama-2k"), max_position_embeddings=2048)


@pytest.fixture(scope="module")
def server(model_path):
    live = LiveServer(model_path, "--replicas", "2", "--router", "kv")
    yield live
    assert live.stop() == 0


def test_replicas_give_the_single_engine_tokens(server, model_path):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    prompts = [f"w{5 + i} w{9 + i} w{13 + i} w{17 + i}" for i in range(8)]
    offline = LLM(str(model_path), num_threads=1, kv_cache_memory_gb=0.05)
    expected = [o.outputs[0].text for o in offline.generate(prompts, SamplingParams(max_tokens=10, temperature=0,
                                                                                   ignore_eos=True))]
    served, replicas = [], []
    for p in prompts:
        raw = client.completions.with_raw_response.create(model="tiny", prompt=p, max_tokens=10, temperature=0,
                                                          extra_body={"ignore_eos": True})
        served.append(raw.parse().choices[0].text)
        replicas.append(raw.headers["x-tokenfab-replica"])
    assert served == expected
    assert set(replicas) <= {"0", "1"}
    both = client.completions.with_raw_response.create(model="tiny", prompt=prompts[:2], max_tokens=2)
    assert len(both.headers["x-tokenfab-replica"].split(",")) == 2
    listed = httpx.get(f"{server.url}/replicas").json()
    assert listed["router"] == "kv" and [r["id"] for r in listed["replicas"]] == [0, 1]
    assert len({r["pid"] for r in listed["replicas"]}) == 2 and all(r["state"] == "running" for r in listed["replicas"])
    assert sum(r["routed"] for r in listed["replicas"]) == 10
    metrics = httpx.get(f"{server.url}/metrics").text
    assert 'tokenfab:replica_routed_total{model_name="tiny",replica="1"}' in metrics
    assert "tokenfab:router_decisions_total" in metrics and "tokenfab:router_index_blocks" in metrics
    assert 'tokenfab:router_ttft_seconds_total{kind="actual",model_name="tiny"}' in metrics
    assert "tokenfab:num_requests_running" in metrics  # the replicas' stats, summed


async def _turn(url: str, turn: int, sessions: int, concurrency: int) -> list[str]:
    gate = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(timeout=120) as http:
        async def one(s: int) -> str:
            async with gate:
                r = await http.post(f"{url}/v1/completions", json={"prompt": session_prompt(s, turn),
                                                                   "max_tokens": 32, "temperature": 0,
                                                                   "ignore_eos": True})
            assert r.status_code == 200, r.text
            return r.headers["x-tokenfab-replica"]

        return list(await asyncio.gather(*(one(s) for s in range(sessions))))


def _settled_index(url: str) -> list[dict]:
    """/replicas once the router's index has stopped changing (the replicas' last KV events have arrived)."""
    listed, deadline = None, time.monotonic() + 10
    while time.monotonic() < deadline:
        now = httpx.get(f"{url}/replicas").json()["replicas"]
        if listed is not None and [r["cached_blocks"] for r in now] == [r["cached_blocks"] for r in listed]:
            return now
        listed = now
        time.sleep(0.3)
    raise AssertionError(f"the router's index kept changing: {listed}")


def test_a_shared_prompt_spreads_and_sessions_stay_where_their_prefix_is(server):
    """32 sessions at once: the shared prompt does not herd them onto one replica. Their next turns (two at a time,
    so neither replica's queue is a reason to move) go where each session's own prefix is cached."""
    first = asyncio.run(_turn(server.url, 0, 32, concurrency=32))
    assert min(first.count("0"), first.count("1")) >= 8, first  # no herding onto the replica holding SYSTEM
    listed = _settled_index(server.url)
    assert all(r["cached_blocks"] > 62 for r in listed)  # the system prompt and sessions' own blocks
    second = asyncio.run(_turn(server.url, 1, 32, concurrency=2))
    assert second == first


def test_each_replica_bills_its_own_price_and_the_slo_picks_the_cheapest(model_path):
    """Replica 0 priced as an H100, replica 1 at $0.02/h: with a TTFT SLO both meet, every request goes to the
    cheaper one, whose price is what its responses' cost is made of."""
    live = LiveServer(model_path, "--replicas", "2", "--replica-price", "0=h100", "--replica-price", "1=0.02",
                      "--slo-ttft", "30")
    try:
        listed = httpx.get(f"{live.url}/replicas").json()["replicas"]
        assert [r["usd_per_hour"] for r in listed] == pytest.approx([2.5, 0.02])
        for k in range(4):
            r = httpx.post(f"{live.url}/v1/completions", json={"prompt": f"w{7 + k} w{11 + k}", "max_tokens": 4},
                           timeout=60)
            assert r.status_code == 200 and r.headers["x-tokenfab-replica"] == "1", r.text
            cost = r.json()["usage"]["cost"]
            assert cost["device_seconds"] > 0
            energy_usd = cost["joules"] / 3.6e6 * 0.12
            assert cost["usd"] == pytest.approx(cost["device_seconds"] * 0.02 / 3600 + energy_usd, rel=1e-6)
        assert 'reason="kv: cheapest within the SLO' in httpx.get(f"{live.url}/metrics").text
    finally:
        assert live.stop() == 0


@pytest.mark.parametrize("late", [False, True], ids=["from-the-start", "missed-events"])
def test_the_index_equals_what_the_replicas_hold(model_path, tmp_path, late):
    """Two engines publishing KV events, a random workload with evictions: the index built from the events alone
    names exactly the blocks each engine's prefix cache holds — also when it followed the engines only after half
    the workload (every batch it missed is fetched from the engines' replay sockets)."""
    import random

    from tokenfab.config import EngineConfig

    engines, index, sockets = [], KvIndex(), []
    for i in range(2):
        endpoint, replay = f"ipc://{tmp_path}/kv-{i}", f"ipc://{tmp_path}/kv-{i}-replay"
        config = EngineConfig(model=str(model_path), dtype="float32", num_threads=1, kv_cache_memory_gb=0.0003,
                              max_model_len=256, kv_events_endpoint=endpoint, kv_events_replay_endpoint=replay)
        engines.append(LLMEngine(config))
        sockets.append((i, endpoint, replay))
    if not late:
        for args in sockets:
            index.follow(*args)
    rng = random.Random(3)
    shared = [rng.randrange(5, 500) for _ in range(48)]
    for n in range(30):
        if late and n == 15:
            for args in sockets:
                index.follow(*args)
            time.sleep(0.2)  # subscribed before the next batch is published
        engine = engines[rng.randrange(2)]
        prompt = shared[: rng.choice([0, 16, 48])] + [rng.randrange(5, 500) for _ in range(rng.randrange(8, 80))]
        engine.add_request(prompt, SamplingParams(max_tokens=rng.randrange(1, 12), temperature=0, ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
    for engine in engines:
        engine.core.kv_events.flush()  # type: ignore[union-attr]
    deadline = time.monotonic() + 10
    truth = [{h for _, h in e.core.kv.cached_block_hashes()} for e in engines]
    while time.monotonic() < deadline and [index.blocks(i) for i in range(2)] != truth:
        index.refresh()
        time.sleep(0.05)
    assert [index.blocks(i) for i in range(2)] == truth and all(truth)
    assert (index.replayed > 0) == late
    for i in range(2):
        held = prompt_blocks(shared, 16)
        leading = next((k for k, h in enumerate(held) if h not in truth[i]), len(held))
        assert index.overlap(i, held) == leading
    index.close()


def test_replicas_on_ray_answer_through_the_openai_client(model_path):
    """Two replicas on a simulated two-node Ray cluster (Ray's own test utility: two raylets here, one CPU each):
    one replica per node, the single-engine tokens through the openai client; a replica whose actor is killed comes
    back as a new actor and serves again."""
    pytest.importorskip("ray")
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        live = LiveServer(model_path, "--replicas", "2", "--ray", "--ray-address", cluster.address,
                          startup_timeout=300)
        try:
            client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
            prompts = ["w5 w6 w7", "w9 w10 w11 w12"]
            resp = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, temperature=0,
                                             extra_body={"ignore_eos": True})
            listed = httpx.get(f"{live.url}/replicas").json()["replicas"]
            os.kill(listed[0]["pid"], signal.SIGKILL)  # its actor dies; Ray places a new one in the same bundle
            deadline = time.monotonic() + 300  # a new actor: slow on a loaded machine
            while time.monotonic() < deadline:
                row = httpx.get(f"{live.url}/replicas").json()["replicas"][0]
                if row["state"] == "running" and row["restarts"] == 1:
                    break
                time.sleep(0.2)
            assert row["restarts"] == 1 and row["pid"] != listed[0]["pid"], row
            again = client.completions.create(model="tiny", prompt=prompts, max_tokens=8, temperature=0,
                                              extra_body={"ignore_eos": True})
        finally:
            assert live.stop() == 0
    finally:
        cluster.shutdown()
    offline = LLM(str(model_path), num_threads=1, kv_cache_memory_gb=0.05)
    expected = offline.generate(prompts, SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert [c.text for c in resp.choices] == [c.text for c in again.choices] == [o.outputs[0].text for o in expected]
    assert len(listed) == 2 and all(r["state"] == "running" and r["pid"] for r in listed)
    assert len({r["ray_node_id"] for r in listed}) == 2  # spread: one replica per node
