"""`tokenfab serve --prefill-replicas 1 --decode-replicas 1` (tiny Gemma 3, prompts past its sliding window): prompts
computed on the prefill replica and their KV pulled by the decode replica give exactly the tokens of one engine
(greedy, seeded, n > 1, streamed); each response's cost includes its prefill leg; killing the prefill replica under
load loses nothing and gives the same tokens (the prompts are computed on the decode replica); afterwards no block
is held on either side."""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from live_server import LiveServer
from tokenfab import LLM, SamplingParams
from tokenfab.engine.kv_transfer.transport import nixl_api

PROMPTS = [" ".join(f"w{5 + (i * 13 + k * 7) % 300}" for k in range(60 + 17 * i)) for i in range(6)]
"""60..145 tokens: past the 24-token window, several blocks each."""


def body(i: int, seeded: bool, n: int = 1, max_tokens: int = 12) -> dict:
    extra = {"temperature": 0.9, "top_p": 0.95, "seed": 100 + i} if seeded else {"temperature": 0}
    return {"prompt": PROMPTS[i], "max_tokens": max_tokens, "ignore_eos": True, "n": n, **extra}


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model("gemma3")


@pytest.fixture(scope="module")
def expected(model_path) -> dict[tuple[int, bool], list[str]]:
    llm = LLM(str(model_path), num_threads=1, kv_cache_memory_gb=0.05)
    out = {}
    for seeded in (False, True):
        for i in range(len(PROMPTS)):
            b = body(i, seeded, n=2)
            params = SamplingParams(**{k: v for k, v in b.items() if k != "prompt"})
            out[(i, seeded)] = [c.text for c in llm.generate([PROMPTS[i]], params)[0].outputs]
    return out


def replicas(url: str) -> list[dict]:
    return httpx.get(f"{url}/replicas").json()["replicas"]


def legs_in_flight(url: str) -> int:
    return httpx.get(f"{url}/replicas").json()["disaggregation"]["prefill_legs_in_flight"]


def held_and_used(server: LiveServer) -> tuple[float, float]:
    m = server.metrics()
    return (m.get('tokenfab:kv_transfer_exports_held{model_name="tiny"}', -1.0),
            m.get('tokenfab:kv_cache_usage_perc{model_name="tiny"}', -1.0))


def assert_nothing_held(server: LiveServer) -> None:
    """No export waits on the prefill replica and no KV block is in use on either side (within 5 s)."""
    deadline = time.monotonic() + 5
    while held_and_used(server) != (0.0, 0.0) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert held_and_used(server) == (0.0, 0.0)


@pytest.mark.parametrize("transport", ["shm", pytest.param("nixl", marks=pytest.mark.skipif(
    nixl_api() is None, reason="NIXL is not installed (pip install 'tokenfab[nixl]')"))])
def test_disaggregated_requests_give_the_single_engine_tokens(model_path, expected, transport):
    server = LiveServer(model_path, "--prefill-replicas", "1", "--decode-replicas", "1", "--disaggregation", "always",
                        "--kv-transport", transport)
    try:
        rows = replicas(server.url)
        assert [r["role"] for r in rows] == ["prefill", "decode"]
        for i in range(len(PROMPTS)):
            for seeded in ((True, False) if i < 3 else (False, True)):  # the first of each prompt goes remote
                r = httpx.post(f"{server.url}/v1/completions", json=body(i, seeded, n=2), timeout=60)
                assert r.status_code == 200, r.text
                got = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
                assert got == expected[(i, seeded)], (i, seeded)
                assert r.headers["x-tokenfab-replica"] == "1"
                assert r.json()["usage"]["cost"]["usd"] > 0
        # Streamed, and the prefill leg's cost is in the response's.
        with httpx.stream("POST", f"{server.url}/v1/completions", timeout=60,
                          json={**body(5, False), "stream": True,
                                "stream_options": {"include_usage": True}}) as stream:
            chunks = [line for line in stream.iter_lines() if line.startswith("data: {")]
        parsed = [json.loads(c[6:]) for c in chunks]
        assert "".join(p["choices"][0]["text"] for p in parsed if p["choices"]) == expected[(5, False)][0]
        assert parsed[-1]["usage"]["cost"]["usd"] > 0
        m = server.metrics()
        # A prompt the decode replica holds already is computed there: nothing to move.
        assert m['tokenfab:router_disaggregation_total{decision="remote",model_name="tiny"}'] == 6
        assert m['tokenfab:router_disaggregation_total{decision="local (short)",model_name="tiny"}'] == 7
        assert m.get('tokenfab:kv_transfer_pulls_total{model_name="tiny"}', 0) >= 6
        assert m.get('tokenfab:kv_transfer_pulled_bytes_total{model_name="tiny"}', 0) > 0
        rows = replicas(server.url)
        assert rows[0]["routed"] == 6 and rows[1]["routed"] == 25  # legs there, sequences here
        assert_nothing_held(server)
    finally:
        assert server.stop() == 0


LOAD = [" ".join(f"w{5 + (k * 31 + j * 7) % 400}" for j in range(80 + (k % 5) * 13)) for k in range(30)]
"""Distinct prompts: each one's prefill goes to the prefill replica."""


def load_body(k: int) -> dict:
    extra = {"temperature": 0.9, "top_p": 0.95, "seed": k} if k % 2 else {"temperature": 0}
    return {"prompt": LOAD[k], "max_tokens": 24, "ignore_eos": True, **extra}


def test_killing_the_prefill_replica_under_load_loses_nothing(model_path):
    llm = LLM(str(model_path), num_threads=1, kv_cache_memory_gb=0.05)
    params = [SamplingParams(**{k: v for k, v in load_body(k).items() if k != "prompt"}) for k in range(len(LOAD))]
    expected = [o.outputs[0].text for o in llm.generate(LOAD, params)]
    server = LiveServer(model_path, "--prefill-replicas", "1", "--decode-replicas", "1", "--disaggregation", "always",
                        "--replica-hang-timeout", "5")
    try:
        prefill_pid = replicas(server.url)[0]["pid"]

        def one(k: int) -> tuple[int, int, str]:
            r = httpx.post(f"{server.url}/v1/completions", json=load_body(k), timeout=120)
            return k, r.status_code, r.json()["choices"][0]["text"] if r.status_code == 200 else r.text

        with ThreadPoolExecutor(4) as pool:
            futures = [pool.submit(one, k) for k in range(len(LOAD))]
            while sum(f.done() for f in futures) < 6:
                time.sleep(0.01)
            os.kill(prefill_pid, signal.SIGSTOP)  # frozen: the legs sent to it stay in flight
            while not legs_in_flight(server.url):
                time.sleep(0.01)
            os.kill(prefill_pid, signal.SIGKILL)  # legs in flight (and maybe exports yet to be pulled)
            results = [f.result() for f in futures]
        wrong = [(k, status, text[:40]) for k, status, text in results if status != 200 or text != expected[k]]
        assert not wrong, wrong
        m = server.metrics()
        decisions = {d: m.get(f'tokenfab:router_disaggregation_total{{decision="{d}",model_name="tiny"}}', 0)
                     for d in ("remote", "fallback")}
        assert decisions["remote"] >= 6 and decisions["fallback"] + m.get(
            'tokenfab:kv_transfer_failures_total{model_name="tiny"}', 0) >= 1, decisions
        deadline = time.monotonic() + 30
        while replicas(server.url)[0]["state"] != "running" and time.monotonic() < deadline:
            time.sleep(0.5)
        assert replicas(server.url)[0]["state"] == "running"  # restarted
        r = httpx.post(f"{server.url}/v1/completions", json=body(0, False, n=2), timeout=60)
        got = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
        assert got == [c.text for c in llm.generate([PROMPTS[0]], SamplingParams(
            **{k: v for k, v in body(0, False, n=2).items() if k != "prompt"}))[0].outputs]
        assert_nothing_held(server)
    finally:
        assert server.stop() == 0


def test_auto_serves_aggregated_and_reports_its_mode(model_path, expected):
    server = LiveServer(model_path, "--replicas", "2", "--disaggregation", "auto")
    try:
        r = httpx.post(f"{server.url}/v1/completions", json=body(1, True, n=2), timeout=60)
        assert [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])] == expected[(1, True)]
        listed = httpx.get(f"{server.url}/replicas").json()
        assert listed["disaggregation"]["mode"] == "aggregated" and listed["disaggregation"]["switches"] == {}
        assert [row["role"] for row in listed["replicas"]] == ["aggregated", "aggregated"]
        info = server.metrics()
        assert info.get('tokenfab:kv_transfer_exports_held{model_name="tiny"}') == 0.0  # the transport is on
    finally:
        assert server.stop() == 0
