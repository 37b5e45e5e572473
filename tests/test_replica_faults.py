"""Nothing accepted is lost when a replica goes: under steady load on `serve --replicas 3`, one replica is killed
(kill -9), one hangs (SIGSTOP) and one is drained — every request completes with the tokens a fault-free engine
gives (greedy and seeded, streamed and whole), the killed and hung replicas come back, no KV block stays held. With
migration off, the requests on a killed replica fail with 503, the rest are served, and a drained replica's requests
finish where they are."""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest

from live_server import LiveServer
from tokenfab import LLM, SamplingParams
from tokenfab.bench.faults import ClosedLoop, busiest, kill_hang_drain, replicas, wait_for

PROMPTS = [" ".join(f"w{5 + (i * 13 + k * 7) % 300}" for k in range(40 + 9 * i)) for i in range(6)]
NEW = 400


def body(i: int, seeded: bool) -> dict:
    extra = {"temperature": 0.9, "top_p": 0.95, "seed": 100 + i} if seeded else {"temperature": 0}
    return {"prompt": PROMPTS[i], "max_tokens": NEW, "ignore_eos": True, **extra}


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def expected(model_path) -> dict[str, str]:
    llm = LLM(str(model_path), num_threads=1, kv_cache_memory_gb=0.05)
    out = {}
    for seeded in (False, True):
        params = [SamplingParams(**{k: v for k, v in body(i, seeded).items() if k != "prompt"}) for i in range(6)]
        for i, o in enumerate(llm.generate(PROMPTS, params)):
            out[f"{i}{'s' if seeded else 'g'}"] = o.outputs[0].text
    return out


def request(n: int) -> tuple[str, dict]:
    i, seeded = n % 6, bool(n // 6 % 2)
    return f"{i}{'s' if seeded else 'g'}", body(i, seeded)


def test_kill_hang_and_drain_under_load_lose_nothing(model_path, expected):
    server = LiveServer(model_path, "--replicas", "3", "--replica-hang-timeout", "2")
    try:
        with ClosedLoop(server.url, request) as load:
            faults = kill_hang_drain(server.url)
        assert faults.drain_reply["state"] == "stopped" and len({faults.killed, faults.hung, faults.drained}) == 3
        assert len(load.outcomes) > 30
        wrong = [(o.key, o.status, o.text[:40]) for o in load.outcomes if o.status != 200 or o.text != expected[o.key]]
        assert not wrong, wrong
        metrics = server.metrics()
        moved = {cause: metrics.get(f'tokenfab:router_migrations_total{{cause="{cause}",model_name="tiny"}}', 0)
                 for cause in ("died", "hung", "drained", "lost")}
        assert moved["died"] > 0 and moved["hung"] > 0 and moved["lost"] == 0, moved
        rows = replicas(server.url)
        assert [r["state"] for r in rows] == ["stopped" if r["id"] == faults.drained else "running" for r in rows]
        assert metrics["tokenfab:kv_cache_free_blocks"] == metrics["tokenfab:kv_cache_total_blocks"]  # none held
        d = faults.drained
        again = httpx.post(f"{server.url}/replicas/{d}/drain", timeout=10)
        assert again.status_code == 409 and again.json()["error"]["code"] == "replica_state"
        assert httpx.post(f"{server.url}/replicas/7/drain", timeout=10).status_code == 404
        assert httpx.post(f"{server.url}/replicas/{d}/resume", timeout=10).status_code == 200
        wait_for(server.url, lambda rows: rows[d]["state"] == "running", f"replica {d} to resume", timeout=20)
        health = httpx.get(f"{server.url}/health").json()
        assert health["status"] == "ok" and [r["state"] for r in health["replicas"]] == ["running"] * 3
    finally:
        assert server.stop() == 0


def test_without_migration_a_killed_replica_fails_its_requests(model_path, expected):
    server = LiveServer(model_path, "--replicas", "2", "--no-migration")
    try:
        with ClosedLoop(server.url, request, workers=4) as load:
            time.sleep(1.5)
            killed = busiest(server.url, {0, 1}, freeze=True)  # stopped with requests in flight
            os.kill(killed["pid"], signal.SIGKILL)
            k = killed["id"]
            wait_for(server.url, lambda rows: rows[k]["state"] == "running" and rows[k]["restarts"] == 1,
                     f"replica {k} to restart")
            time.sleep(0.5)
            drained = httpx.post(f"{server.url}/replicas/{1 - k}/drain", timeout=120)  # its requests finish there
            assert drained.status_code == 200 and "finished" in drained.json(), drained.text
            time.sleep(0.5)
        failed = [o.status for o in load.outcomes if o.status != 200]
        assert failed and set(failed) <= {503, "engine_unavailable"}, failed
        assert all(o.text == expected[o.key] for o in load.outcomes if o.status == 200)
        assert server.metrics()['tokenfab:router_migrations_total{cause="lost",model_name="tiny"}'] == len(failed)
    finally:
        assert server.stop() == 0
