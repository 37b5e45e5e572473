"""One EngineClient protocol, every transport: the server gives the offline engine's tokens with its core spawned
over ipc or tcp, on a thread of its own process, or started separately (`tokenfab core --connect`, as on another
host); the in-process client serves a request without a server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time

import httpx
import openai
import pytest

from live_server import LiveServer
from tokenfab import LLM, SamplingParams
from tokenfab.bench.launch import free_port
from tokenfab.config import EngineConfig
from tokenfab.engine.block_hash import block_hashes, external_hash
from tokenfab.engine.client import CoreAddresses, InProcessClient, make_engine_client
from tokenfab.engine.kv_events import KVEventSubscriber
from tokenfab.engine.messages import CoreRequest

PROMPT = "w5 w6 w7 w8 w9"


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def expected(model_path):
    llm = LLM(str(model_path), num_threads=1, kv_cache_memory_gb=0.05)
    return llm.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]


def complete(server: LiveServer) -> str:
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    resp = client.completions.create(model="tiny", prompt=PROMPT, max_tokens=10, temperature=0,
                                     extra_body={"ignore_eos": True})
    return resp.choices[0].text


@pytest.mark.parametrize("transport", ["tcp", "inproc"])
def test_server_over_each_transport_gives_the_offline_tokens(model_path, expected, transport):
    server = LiveServer(model_path, "--engine-transport", transport)
    try:
        assert complete(server) == expected.outputs[0].text
    finally:
        assert server.stop() == 0


def test_a_server_publishes_kv_events_that_name_the_prompt_blocks(model_path):
    """`--kv-events-endpoint` through the CLI and the core process: the card says where, a subscriber gets the
    prompt's blocks under the hashes a router computes from the same tokens."""
    server = LiveServer(model_path, "--kv-events-endpoint", "tcp://127.0.0.1:*", "--kv-events-replay-endpoint",
                        "tcp://127.0.0.1:*", "--block-size", "8")
    try:
        card = httpx.get(f"{server.url}/v1/models", timeout=10).json()["data"][0]
        assert card["block_size"] == 8 and card["kv_events_endpoint"].startswith("tcp://127.0.0.1:")
        sub = KVEventSubscriber(card["kv_events_endpoint"], card["kv_events_replay_endpoint"])
        try:
            prompt = " ".join(f"w{i}" for i in range(3, 40))
            ids = httpx.post(f"{server.url}/tokenize", json={"prompt": prompt}, timeout=10).json()["tokens"]
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
            client.completions.create(model="tiny", prompt=prompt, max_tokens=2, temperature=0)
            deadline = time.monotonic() + 30
            want = {external_hash(h) for h in block_hashes(ids, 8)}
            while not want <= {h for _, h in sub.blocks} and time.monotonic() < deadline:
                sub.poll(200)
                sub.catch_up()
            assert want and want <= {h for _, h in sub.blocks}
        finally:
            sub.close()
        cli = subprocess.run([sys.executable, "-m", "tokenfab.cli", "kv-events", "--connect", card["kv_events_endpoint"],
                              "--replay", card["kv_events_replay_endpoint"], "--count", "1"],
                             capture_output=True, text=True, timeout=60)
        assert cli.returncode == 0, cli.stderr
        first = json.loads(cli.stdout.splitlines()[0])
        assert first["type"] == "BlockStored" and first["seq"] == 0 and first["block_size"] == 8
    finally:
        assert server.stop() == 0


def test_server_waits_for_a_core_started_elsewhere(model_path, expected):
    address = f"tcp://127.0.0.1:{free_port()}"
    core = subprocess.Popen([sys.executable, "-m", "tokenfab.cli", "core", "--connect", address, "--model",
                             str(model_path), "--threads", "1", "--kv-cache-memory-gb", "0.05"])
    try:
        server = LiveServer(model_path, "--engine-transport", address, "--external-core")
        try:
            assert complete(server) == expected.outputs[0].text
        finally:
            assert server.stop() == 0
        assert core.wait(timeout=30) == 0  # the server's shutdown stops the core too
    finally:
        if core.poll() is None:
            core.kill()


def test_transport_specs():
    assert CoreAddresses.parse("tcp://10.0.0.5:7000") == CoreAddresses("tcp://10.0.0.5:7000", "tcp://10.0.0.5:7001")
    assert CoreAddresses.parse("ipc").to_core.startswith("ipc://")
    for bad in ("udp://x:1", "tcp://nohost", "tcp://h:0"):
        with pytest.raises(ValueError):
            CoreAddresses.parse(bad)
    assert isinstance(make_engine_client(EngineConfig(), "inproc"), InProcessClient)


def test_in_process_client_streams_results_and_stats(model_path, expected):
    async def run() -> list[int]:
        client = InProcessClient(EngineConfig(model=str(model_path), num_threads=1, kv_cache_memory_gb=0.05))
        info = await client.start()
        assert info.vocab_size > 0 and client.alive
        params = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
        await client.add([CoreRequest("a", list(expected.prompt_token_ids), params, 0.0)])
        tokens: list[int] = []
        async for result in client.results():
            for out in result.outputs:
                tokens += out.new_token_ids
            if any(out.finish_reason for out in result.outputs):
                break
        assert client.stats is not None and client.stats.scheduler.generated_tokens == 10
        await client.shutdown()
        assert not client.alive
        return tokens

    assert asyncio.run(run()) == expected.outputs[0].token_ids
