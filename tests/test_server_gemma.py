"""`tokenfab serve` with no arguments serves the real Gemma 3 270M; answers equal the offline engine's."""

from __future__ import annotations

import openai
import pytest

from live_server import LiveServer
from tokenfab import LLM, SamplingParams

pytestmark = pytest.mark.slow


def test_default_server_matches_offline_greedy():
    server = LiveServer(None, "--kv-cache-memory-gb", "0.25")
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["gemma-3-270m"]
        prompts = ["The capital of France is", "def fibonacci(n):"]
        resp = client.completions.create(model="gemma-3-270m", prompt=prompts, max_tokens=16, temperature=0)
        chat = client.chat.completions.create(model="gemma-3-270m", max_tokens=12, temperature=0,
                                              messages=[{"role": "user", "content": "Name a planet."}])
    finally:
        assert server.stop() == 0
    llm = LLM(kv_cache_memory_gb=0.25)
    expected = llm.generate(prompts, SamplingParams(max_tokens=16, temperature=0))
    assert [c.text for c in resp.choices] == [o.outputs[0].text for o in expected]
    offline_chat = llm.chat([{"role": "user", "content": "Name a planet."}], SamplingParams(max_tokens=12,
                                                                                          temperature=0))
    assert chat.choices[0].message.content == offline_chat[0].outputs[0].text
    assert resp.usage.model_extra["cost"]["usd"] > 0
