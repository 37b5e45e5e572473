"""The server under stress: overload gets 429 and loses nothing admitted, dropped streams free their KV blocks,
SIGTERM drains in-flight requests and exits 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import pytest

from live_server import LiveServer


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model("llama")


def rss_mb(pid: int) -> float:
    """Resident memory of a process and its children, in MB."""
    total = 0.0
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    for p in pids:
        with open(f"/proc/{p}/status") as f:
            total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    return total


async def _complete(ac: httpx.AsyncClient, i: int, max_tokens: int) -> httpx.Response:
    return await ac.post("/v1/completions", json={"prompt": f"w{5 + i % 50} w6 w7", "max_tokens": max_tokens,
                                                  "temperature": 0, "ignore_eos": True})


def test_overload_gets_429_and_every_admitted_request_completes(model_path):
    server = LiveServer(model_path, "--max-num-seqs", "2", "--max-queued-requests", "4")
    try:
        rss_before = rss_mb(server.proc.pid)

        async def burst(n: int) -> list[httpx.Response]:
            limits = httpx.Limits(max_connections=n)
            async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as ac:
                return await asyncio.gather(*(_complete(ac, i, 64) for i in range(n)))

        for _ in range(3):  # three waves of 60 requests against room for 6
            responses = asyncio.run(burst(60))
            ok = [r for r in responses if r.status_code == 200]
            busy = [r for r in responses if r.status_code == 429]
            assert len(ok) + len(busy) == len(responses), {r.status_code for r in responses}
            assert len(ok) >= 6 and len(busy) >= 30
            for r in ok:
                choice = r.json()["choices"][0]
                assert choice["finish_reason"] == "length" and r.json()["usage"]["completion_tokens"] == 64
            for r in busy:
                assert int(r.headers["retry-after"]) >= 1
                assert r.json()["error"]["code"] == "server_overloaded"
        assert rss_mb(server.proc.pid) - rss_before < 150
        metrics = server.metrics()
        assert metrics['tokenfab:request_success_total{finished_reason="length",model_name="tiny"}'] >= 18
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        assert server.stop() == 0


def test_dropped_streams_free_their_kv_blocks(model_path):
    server = LiveServer(model_path, "--max-num-seqs", "64")
    try:
        async def drop_one(ac: httpx.AsyncClient, i: int) -> int:
            body = {"prompt": " ".join(f"w{5 + (i + k) % 400}" for k in range(40)), "max_tokens": 500,
                    "temperature": 0.8, "ignore_eos": True, "stream": True}
            received = 0
            async with ac.stream("POST", "/v1/completions", json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    received += line.startswith("data: ")
                    if received >= 3:
                        break  # leave mid-stream: the connection closes with the block
            return received

        async def drop_all() -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=120,
                                         limits=httpx.Limits(max_connections=50)) as ac:
                return await asyncio.gather(*(drop_one(ac, i) for i in range(50)))

        assert all(n >= 3 for n in asyncio.run(drop_all()))
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            m = server.metrics()
            if m["tokenfab:num_requests_running"] == 0 and m["tokenfab:num_requests_waiting"] == 0:
                break
            time.sleep(0.2)
        assert m["tokenfab:num_requests_running"] == 0 and m["tokenfab:num_requests_waiting"] == 0
        assert m["tokenfab:kv_cache_free_blocks"] == m["tokenfab:kv_cache_total_blocks"]
        assert m["tokenfab:kv_cache_usage_perc"] == 0.0
        assert m["tokenfab:engine_generated_tokens_total"] < 50 * 500 / 2  # aborted long before max_tokens
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "w5", "max_tokens": 4}, timeout=30)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    finally:
        assert server.stop() == 0


def test_sigterm_drains_in_flight_requests_and_exits_0(model_path):
    server = LiveServer(model_path, "--graceful-shutdown-timeout", "60")

    async def stream_one(ac: httpx.AsyncClient, i: int, started: asyncio.Event) -> tuple[str | None, int]:
        body = {"prompt": f"w{5 + i} w6", "max_tokens": 120, "temperature": 0, "ignore_eos": True, "stream": True}
        finish, chunks = None, 0
        async with ac.stream("POST", "/v1/completions", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                assert "error" not in data, data
                chunks += 1
                started.set()
                finish = data["choices"][0]["finish_reason"] or finish
        return finish, chunks

    async def run() -> list[tuple[str | None, int]]:
        started = asyncio.Event()
        async with httpx.AsyncClient(base_url=server.url, timeout=120) as ac:
            tasks = [asyncio.create_task(stream_one(ac, i, started)) for i in range(6)]
            await started.wait()
            server.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)
            with pytest.raises(httpx.HTTPError):  # no new connections once draining
                async with httpx.AsyncClient(timeout=5) as fresh:
                    await fresh.post(f"{server.url}/v1/completions", json={"prompt": "w5"})
            return await asyncio.gather(*tasks)

    try:
        results = asyncio.run(run())
        assert [finish for finish, _ in results] == ["length"] * 6
        assert server.proc.wait(60) == 0
    finally:
        server.stop()


def test_request_timeout_aborts_and_frees_blocks(model_path):
    server = LiveServer(model_path, "--request-timeout", "0.5")
    try:
        body = {"prompt": "w5 w6", "max_tokens": 1000, "temperature": 0, "ignore_eos": True, "n": 8}
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 504 and r.json()["error"]["code"] == "request_timeout"
        time.sleep(0.5)
        m = server.metrics()
        assert m["tokenfab:num_requests_running"] == 0
        assert m["tokenfab:kv_cache_free_blocks"] == m["tokenfab:kv_cache_total_blocks"]
        quick = httpx.post(f"{server.url}/v1/completions", json={"prompt": "w5", "max_tokens": 2}, timeout=30)
        assert quick.status_code == 200
    finally:
        assert server.stop() == 0


def test_dead_engine_is_reported_not_hung(model_path):
    server = LiveServer(model_path)
    try:
        assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "w5", "max_tokens": 2}).status_code == 200
        assert "tokenfab:num_requests_running" in server.metrics() and server.metrics()["tokenfab:engine_alive"] == 1
        with open(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children") as f:
            children = [int(p) for p in f.read().split()]
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and httpx.get(f"{server.url}/health").status_code == 200:
            time.sleep(0.2)
        assert httpx.get(f"{server.url}/health").status_code == 503
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "w5", "max_tokens": 2}, timeout=30)
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_unavailable"
        m = server.metrics()
        assert m["tokenfab:engine_alive"] == 0
        assert "tokenfab:num_requests_running" not in m and "tokenfab:kv_cache_usage_perc" not in m  # not stale
        assert m['tokenfab:request_rejected_total{model_name="tiny",status="503"}'] >= 1
    finally:
        code = server.stop()
    assert code == 3  # a supervisor's Restart=on-failure sees the crash


def test_a_hung_engine_fails_its_health_check_until_it_steps_again(model_path):
    """A core that stops stepping while it has work (SIGSTOP) makes /health answer 503 engine_hung, though its
    process lives and the front end answers; once it steps again, 200 — and the request it held completes."""
    server = LiveServer(model_path, "--replica-hang-timeout", "1")
    try:
        core = httpx.get(f"{server.url}/replicas").json()["replicas"][0]["pid"]
        os.kill(core, signal.SIGSTOP)
        try:
            with httpx.Client(timeout=60) as http, http.stream(
                "POST", f"{server.url}/v1/completions",
                json={"prompt": "w5 w6", "max_tokens": 50, "ignore_eos": True, "stream": True},
            ) as stream:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and httpx.get(f"{server.url}/health").status_code == 200:
                    time.sleep(0.1)
                health = httpx.get(f"{server.url}/health")
                assert health.status_code == 503 and health.json()["status"] == "engine_hung"
                os.kill(core, signal.SIGCONT)
                assert [line for line in stream.iter_lines() if line][-1] == "data: [DONE]"
        finally:
            os.kill(core, signal.SIGCONT)
        assert httpx.get(f"{server.url}/health").status_code == 200
    finally:
        assert server.stop() == 0
