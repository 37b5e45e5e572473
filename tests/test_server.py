"""The server over HTTP with the official openai client: results equal the offline engine, parameters work,
bad input gets a named 4xx, cost in usage adds up to the server's counters."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from live_server import LiveServer
from tokenfab import LLM, SamplingParams
from tokenfab.kernels import build
from tokenfab.platform import cpu_isa

PROMPTS = ["w5 w6 w7", "w9 w10 w11 w12 w13 w14"]


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def request_log(tmp_path_factory):
    return tmp_path_factory.mktemp("log") / "requests.jsonl"


@pytest.fixture(scope="module")
def server(model_path, request_log):
    live = LiveServer(model_path, "--request-log", str(request_log))
    yield live
    assert live.stop() == 0


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def offline(model_path):
    return LLM(str(model_path), num_threads=1, kv_cache_memory_gb=0.05)


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, **kw)


def test_completions_equal_offline_generate(client, offline):
    resp = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=12, temperature=0,
                                     extra_body={"ignore_eos": True})
    expected = offline.generate(PROMPTS, greedy(12))
    assert [c.index for c in resp.choices] == [0, 1]
    for choice, out in zip(resp.choices, expected):
        assert choice.text == out.outputs[0].text and choice.finish_reason == "length"
    u = resp.usage
    assert u.completion_tokens == 24 and u.prompt_tokens == sum(len(o.prompt_token_ids) for o in expected)
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens


def test_token_id_prompts_and_echo(client, offline):
    ids = offline.tokenizer.encode(PROMPTS[0])
    resp = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0, echo=True,
                                     extra_body={"ignore_eos": True})
    out = offline.generate([ids], greedy(6))[0].outputs[0]
    assert resp.choices[0].text == offline.tokenizer.decode(ids, False) + out.text


def test_streaming_completion_equals_whole(client):
    kw = dict(model="tiny", prompt=PROMPTS[1], max_tokens=15, temperature=0, extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 15
    cost = chunks[-1].usage.model_extra["cost"]
    assert cost["energy_source"] in ("measured", "modelled") and cost["usd"] > 0 and cost["device_seconds"] > 0


def test_chat_equals_offline_chat(client, offline):
    messages = [{"role": "system", "content": "w20 w21"}, {"role": "user", "content": "w30 w31 w32"}]
    expected = offline.chat(messages, greedy(10))[0].outputs[0].text
    resp = client.chat.completions.create(model="tiny", messages=messages, max_completion_tokens=10, temperature=0,
                                          extra_body={"ignore_eos": True})
    assert resp.choices[0].message.content == expected and resp.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_n_and_seed_reproducibility(client):
    kw = dict(model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=1.0, n=3, extra_body={"ignore_eos": True})
    a = client.completions.create(seed=7, **kw)
    b = client.completions.create(seed=7, **kw)
    c = client.completions.create(seed=8, **kw)
    assert sorted(ch.index for ch in a.choices) == [0, 1, 2]
    texts = [ch.text for ch in sorted(a.choices, key=lambda ch: ch.index)]
    assert texts == [ch.text for ch in sorted(b.choices, key=lambda ch: ch.index)]
    assert texts != [ch.text for ch in sorted(c.choices, key=lambda ch: ch.index)]
    assert len(set(texts)) > 1  # siblings draw different samples
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5"}], n=2,
                                          max_tokens=5, temperature=1.0, seed=3)
    assert sorted(ch.index for ch in chat.choices) == [0, 1]


def test_stop_string_truncates(client, offline):
    free = offline.generate([PROMPTS[0]], greedy(12))[0].outputs[0].text
    word = free.split()[4]
    resp = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=12, temperature=0, stop=[word],
                                     extra_body={"ignore_eos": True})
    choice = resp.choices[0]
    assert choice.finish_reason == "stop" and choice.text == free[: free.index(word)]
    assert choice.model_extra["stop_reason"] == word


def test_logprobs_match_offline(client, offline):
    resp = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5, temperature=0, logprobs=3,
                                     extra_body={"ignore_eos": True})
    lp = resp.choices[0].logprobs
    expected = offline.generate([PROMPTS[0]], greedy(5, logprobs=3))[0].outputs[0].logprobs
    assert len(lp.tokens) == 5 and all(len(t) == 3 for t in lp.top_logprobs)
    assert lp.token_logprobs == pytest.approx([e.logprob for e in expected], abs=1e-4)
    chat = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "w5"}], max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(c.top_logprobs) == 2 and c.logprob <= 0 for c in content)
    assert all(c.top_logprobs[0].logprob >= c.top_logprobs[1].logprob for c in content)


BAD = [
    ({"prompt": "w5", "foo": 1}, 400, "foo"),
    ({"prompt": "w5", "logit_bias": {"5": 1}}, 400, "logit_bias"),
    ({"prompt": "w5", "suffix": "x"}, 400, "suffix"),
    ({"prompt": "w5", "temperature": 3}, 400, "temperature"),
    ({"prompt": "w5", "temperature": "hot"}, 400, "temperature"),
    ({"prompt": "w5", "top_p": 0}, 400, "top_p"),
    ({"prompt": "w5", "n": 0}, 400, "n"),
    ({"prompt": "w5", "max_tokens": 0}, 400, "max_tokens"),
    ({"prompt": "w5", "max_tokens": 10**9}, 400, "prompt"),
    ({"prompt": "w5", "best_of": 3}, 400, "best_of"),
    ({"prompt": "w5", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"prompt": "w5", "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ({"prompt": ""}, 400, "prompt"),
    ({"prompt": []}, 400, "prompt"),
    ({"prompt": [10**7]}, 400, "prompt"),
    ({"prompt": " ".join(["w5"] * 1100)}, 400, "prompt"),
    ({}, 400, "prompt"),
    ({"prompt": "w5", "model": "gpt-4"}, 404, "model"),
]


@pytest.mark.parametrize("body,status,param", BAD)
def test_bad_completion_requests_get_named_4xx(server, body, status, param):
    r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"] and error["type"]


TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}


@pytest.mark.parametrize("body,param", [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "w5"}]}, "messages.0.role"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages.0.content.str"),
    ({"messages": [{"role": "user", "content": "w5"}], "tools": []}, "tools"),
    ({"messages": [{"role": "user", "content": "w5"}], "tool_choice": "required"}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "w5"}], "tools": [TOOL],
      "tool_choice": {"type": "function", "function": {"name": "other"}}}, "tool_choice"),
    ({"messages": [{"role": "user", "content": "w5"}], "tools": [TOOL, TOOL]}, "tools"),
    ({"messages": [{"role": "user", "content": "w5"}], "tools": [{"type": "function", "function": {"name": "a b"}}]},
     "tools.0.function.name"),
    ({"messages": [{"role": "user", "content": "w5"}], "tools": [TOOL], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": [{"role": "tool", "content": "w5"}]}, "messages.0"),
    ({"messages": [{"role": "assistant", "tool_calls": [{"id": "c", "type": "function",
                                                          "function": {"name": "f", "arguments": "[1"}}]}]},
     "messages.0.tool_calls.0"),
    ({"messages": [{"role": "user", "content": "w5"}], "top_logprobs": 2}, "top_logprobs"),
    ({"messages": [{"role": "user", "content": "w5"}], "response_format": {"type": "json_schema"}},
     "response_format.json_schema"),
])
def test_bad_chat_requests_get_named_400(server, body, param):
    r = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param.split(".str")[0])


@pytest.mark.parametrize("raw", [b"{not json", b'{"prompt": "\xff\xfe"}', b"[1, 2]", b""])
def test_malformed_bodies_get_400(server, raw):
    r = httpx.post(f"{server.url}/v1/completions", content=raw, headers={"content-type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["message"]


def test_service_endpoints(server, offline):
    assert httpx.get(f"{server.url}/health").status_code == 200
    assert httpx.get(f"{server.url}/ready").json() == {"ready": True}
    models = httpx.get(f"{server.url}/v1/models").json()
    assert models["data"][0]["id"] == "tiny" and models["data"][0]["max_model_len"] == 1024
    card = models["data"][0]
    assert card["kernel_isa"] == (build.kernel_path().level or "torch") and card["kernel_isa_reason"]
    assert card["cpu_flags"] == cpu_isa.vector_flags() and card["batch_invariant"] is True
    assert card["block_size"] == 16 and card["kv_events_endpoint"] is None  # events are off unless asked for
    tok = httpx.post(f"{server.url}/tokenize", json={"prompt": PROMPTS[0]}).json()
    assert tok["tokens"] == offline.tokenizer.encode(PROMPTS[0]) and tok["count"] == len(tok["tokens"])
    text = httpx.post(f"{server.url}/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"]
    assert text == offline.tokenizer.decode(tok["tokens"], False)
    chat_tok = httpx.post(f"{server.url}/tokenize", json={"messages": [{"role": "user", "content": "w5"}]}).json()
    assert chat_tok["tokens"] == offline.tokenizer.encode_chat([{"role": "user", "content": "w5"}])
    info = httpx.get(f"{server.url}/tokenizer_info").json()  # lm-eval's remote tokenizer reads this
    assert (info["bos_token"], info["eos_token"], info["add_bos_token"]) == ("w1", "w2", True)
    assert info["chat_template"] == offline.tokenizer.special.chat_template and info["model_max_length"] == 1024
    for page in ("/openapi.json", "/docs"):  # opt-in (--enable-docs; the fuzz test reads the schema)
        assert httpx.get(f"{server.url}{page}").status_code == 404
    metrics = httpx.get(f"{server.url}/metrics").text
    for name in ("tokenfab:num_requests_running", "tokenfab:kv_cache_usage_perc", "tokenfab:time_to_first_token",
                 "tokenfab:e2e_request_latency_seconds", "tokenfab:cost_usd_total", "tokenfab:joules_per_token",
                 "tokenfab:usd_per_million_tokens", "tokenfab:prefix_cache_hits_total",
                 "tokenfab:request_prefill_time_seconds", "tokenfab:request_decode_time_seconds",
                 "tokenfab:request_inference_time_seconds", "tokenfab:iteration_tokens_total"):
        assert name in metrics
    assert "tokenfab:engine_alive{model_name=\"tiny\"} 1.0" in metrics


def test_usage_cost_adds_up_to_the_server_counters(server):
    before = server.metrics()

    async def run():
        async with openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0) as ac:
            async def one(i):
                return await ac.completions.create(model="tiny", prompt=f"w{5 + i} w7 w8", max_tokens=300,
                                                   temperature=0, extra_body={"ignore_eos": True})
            start = time.monotonic()
            results = await asyncio.gather(*(one(i) for i in range(16)))
            return results, time.monotonic() - start

    results, wall = asyncio.run(run())
    after = server.metrics()
    costs = [r.usage.model_extra["cost"] for r in results]
    usd = sum(c["usd"] for c in costs)
    seconds = sum(c["device_seconds"] for c in costs)
    joules = sum(c["joules"] for c in costs)
    d = {k: after[k] - before.get(k, 0.0) for k in ("tokenfab:cost_usd_total", "tokenfab:engine_busy_seconds_total",
                                                    "tokenfab:energy_joules_total")}
    # Every step is split over the requests in it, so the parts add up to the counters (float rounding only).
    assert usd == pytest.approx(d["tokenfab:cost_usd_total"], rel=1e-6)
    assert seconds == pytest.approx(d["tokenfab:engine_busy_seconds_total"], rel=1e-6)
    assert joules == pytest.approx(d["tokenfab:energy_joules_total"], rel=1e-6)
    # And the engine was billed for (nearly) all of the wall time it was kept busy: within 30 %.
    assert 0.7 * wall <= seconds <= wall * 1.02
    price = after["tokenfab:device_price_usd_per_hour"] / 3600
    kwh = after["tokenfab:energy_price_usd_per_kwh"] / 3.6e6
    assert usd == pytest.approx(seconds * price + joules * kwh, rel=1e-6)
    assert {c["energy_source"] for c in costs} == {"modelled"}  # no RAPL or NVML on the test machines


def test_request_log_bills_the_user(client, request_log):
    resp = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5, user="alice-42")
    records = [json.loads(line) for line in request_log.read_text().splitlines()]
    mine = [r for r in records if r["id"] == resp.id]
    assert len(mine) == 1 and mine[0]["user"] == "alice-42" and mine[0]["status"] == "ok"
    assert mine[0]["completion_tokens"] == resp.usage.completion_tokens
    assert mine[0]["cost"]["usd"] == pytest.approx(resp.usage.model_extra["cost"]["usd"], rel=1e-9)


def test_a_session_turn_keeps_its_kv_and_its_cost_is_logged_under_the_session(client, server, request_log):
    prompt = " ".join(f"w{5 + i % 90}" for i in range(80))
    resp = client.completions.create(model="tiny", prompt=prompt, max_tokens=3,
                                     extra_body={"session": {"id": "agent-42", "ttl_s": 5}})
    metrics = httpx.get(f"{server.url}/metrics").text
    pinned = [line for line in metrics.splitlines() if line.startswith("tokenfab:kv_cache_pinned_blocks{")]
    assert pinned and float(pinned[0].rsplit(" ", 1)[1]) >= 4  # the prompt's full blocks, kept for the next turn
    records = [json.loads(line) for line in request_log.read_text().splitlines()]
    assert [r["session"] for r in records if r["id"] == resp.id] == ["agent-42"]
    again = client.completions.create(model="tiny", prompt=prompt + " w7", max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens >= 64
    for session, field in [({"id": "a", "ttl_s": 0}, "ttl_s"), ({"id": "a", "ttl_s": 1e6}, "ttl_s"),
                           ({"id": "", "ttl_s": 5}, "id"), ({"id": "a"}, "ttl_s"),
                           ({"id": "a", "ttl_s": 5, "pin": True}, "pin"), ("agent-42", "session")]:
        r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "w5", "max_tokens": 1, "session": session})
        assert r.status_code == 400 and field in r.json()["error"]["message"], (session, r.text)


def test_echoed_prompts_are_scored_for_evaluation(client, offline):
    """lm-eval's loglikelihood request (token ids, echo, logprobs, max_tokens 1 or 0): the prompt's logprobs as the
    offline engine computes them in the prefill, the first token without one."""
    context, continuation = offline.tokenizer.encode("w5 w6 w7 w8"), offline.tokenizer.encode("w9 w10", False)
    ids = context + continuation
    ref = offline.generate([ids], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0].prompt_logprobs
    for max_tokens in (1, 0):
        resp = client.completions.create(model="tiny", prompt=[ids], max_tokens=max_tokens, echo=True, logprobs=1,
                                         temperature=0)
        lp = resp.choices[0].logprobs
        assert len(lp.tokens) == len(ids) + max_tokens and lp.token_logprobs[0] is None
        assert lp.token_logprobs[1:len(ids)] == pytest.approx([e.logprob for e in ref], abs=1e-5)
        assert all(max(top.values()) >= value for top, value in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
        loglikelihood = sum(lp.token_logprobs[len(context):len(ids)])
        assert loglikelihood == pytest.approx(sum(e.logprob for e in ref[len(context) - 1:]), abs=1e-4)
        assert resp.usage.completion_tokens == max_tokens and resp.usage.prompt_tokens == len(ids)
        assert resp.choices[0].text.startswith(offline.tokenizer.decode(ids, False))
    chunks = list(client.completions.create(model="tiny", prompt="w5 w6 w7", max_tokens=0, echo=True, logprobs=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].text == "w5 w6 w7" and chunks[0].choices[0].logprobs.token_logprobs[0] is None
    assert len(chunks[0].choices[0].logprobs.token_logprobs) == len(offline.tokenizer.encode("w5 w6 w7"))
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 0
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="w5", max_tokens=0)
