"""The server under a hostile-but-fair client: each reproduction is the input and the right 4xx (or success) the
assertion. Bounded bodies and lists, long texts off the event loop, idle and half-sent connections closed, text
hygiene, a prompt list counted as requests, authentication and Host/Origin checks, honest metrics, lenient nulls."""

from __future__ import annotations

import json
import os
import resource
import socket
import threading
import time

import httpx
import openai
import pytest

from live_server import LiveServer

HEADER_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def server(model_path):
    live = LiveServer(model_path, "--max-body-mb", "1", "--header-timeout", str(HEADER_TIMEOUT),
                      "--max-connections", "300", "--max-num-seqs", "4", "--max-queued-requests", "8")
    yield live
    assert live.stop() == 0


def post(server: LiveServer, path: str, body: dict | None = None, **kw) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=60, **kw)


def assert_error(r: httpx.Response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["message"] and error["type"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# -- 1. bounded work ---------------------------------------------------------------------------------------------


def raw_request(server: LiveServer, head: bytes, body: bytes = b"") -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as s:
        s.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        return data


def test_a_huge_body_is_refused_before_it_is_read(server):
    started = time.monotonic()
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 52428800\r\n\r\n")
    answer = raw_request(server, head)  # 50 MB announced, not one byte sent
    assert answer.startswith(b"HTTP/1.1 413") and time.monotonic() - started < 5

    def chunks():
        yield b'{"prompt": "'
        for _ in range(40):
            yield b"w5 " * 20_000  # 2.4 MB in all, sent chunked (no Content-Length)
        yield b'"}'

    r = httpx.post(f"{server.url}/v1/completions", content=chunks(), timeout=60)
    assert_error(r, 413, code="request_too_large")


def test_long_inputs_are_refused_cheaply_and_others_stay_served(server):
    """Near the body limit: a long prompt, a long token list, long chats — refused by their size without tokenizing;
    /tokenize of a long text is tokenized off the event loop while /health keeps answering."""
    long_text = "w5 w6 " * 150_000  # 900 kB
    health: list[float] = []
    stop = threading.Event()

    def probe():
        with httpx.Client(base_url=server.url, timeout=30) as c:
            while not stop.is_set():
                t = time.monotonic()
                assert c.get("/health").status_code == 200
                health.append(time.monotonic() - t)
                time.sleep(0.02)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        for _ in range(3):
            assert_error(post(server, "/v1/completions", {"prompt": long_text}), 400, "prompt",
                         "context_length_exceeded")
            assert_error(post(server, "/v1/completions", {"prompt": [5] * 100_000}), 400, "prompt",
                         "context_length_exceeded")
            chat = {"messages": [{"role": "user", "content": long_text}]}
            assert_error(post(server, "/v1/chat/completions", chat), 400, "messages", "context_length_exceeded")
            tok = post(server, "/tokenize", {"prompt": long_text})
            assert tok.status_code == 200 and tok.json()["count"] == 300_001
    finally:
        stop.set()
        prober.join()
    assert len(health) >= 5 and max(health) < 1.0


@pytest.mark.parametrize("body, param", [
    ({"prompt": [f"w{i % 50}" for i in range(600)], "max_tokens": 1}, "prompt"),
    ({"prompt": "w5", "stop": "w6 " * 300}, "stop"),
    ({"prompt": "w5", "stop": ["w6"] * 17}, "stop"),
    ({"prompt": "w5", "stop_token_ids": list(range(300))}, "stop_token_ids"),
], ids=["600-prompts", "long-stop", "17-stops", "300-stop-ids"])
def test_lists_and_strings_are_bounded(server, body, param):
    assert_error(post(server, "/v1/completions", body), 400, param)


def test_a_chat_with_too_many_messages_is_refused(server):
    messages = [{"role": "user" if i % 2 == 0 else "assistant", "content": "w5"} for i in range(8193)]
    assert_error(post(server, "/v1/chat/completions", {"messages": messages}), 400, "messages")


# -- 2. connections ----------------------------------------------------------------------------------------------


def test_idle_and_half_sent_connections_are_closed_and_others_served(server):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2048:  # this process holds the sockets
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    log_before = len(server.output())
    sockets = []
    for i in range(2000):  # thousands, against --max-connections 300
        s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
        if i % 2:
            s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-")  # half a header
        sockets.append(s)
    try:
        assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200
        r = post(server, "/v1/completions", {"prompt": "w5 w6", "max_tokens": 4})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        time.sleep(HEADER_TIMEOUT * 1.5 + 1.0)  # the timeout is spread over [T, 1.5 T]
        for s in sockets:  # every one was closed by the server: evicted or timed out
            s.settimeout(5)
            try:
                assert s.recv(1024) == b""
            except ConnectionResetError:
                pass
    finally:
        for s in sockets:
            s.close()
    m = server.metrics()
    assert m['tokenfab:connections_closed_total{model_name="tiny",reason="evicted"}'] >= 1600
    assert m['tokenfab:connections_closed_total{model_name="tiny",reason="header_timeout"}'] >= 100
    assert len(server.output()) - log_before < 5_000  # nothing logged per connection


# -- 3. text hygiene ---------------------------------------------------------------------------------------------


def test_unpaired_surrogates_are_a_400_naming_the_field(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        def send(path: str, raw: str) -> httpx.Response:
            return c.post(path, content=raw.encode(), headers={"Content-Type": "application/json"})

        assert_error(send("/v1/completions", '{"prompt": "a\\ud800b", "max_tokens": 2}'), 400, "prompt")
        chat = '{"messages": [{"role": "user", "content": "hi \\udc00"}], "max_tokens": 2}'
        assert_error(send("/v1/chat/completions", chat), 400, "messages.0.content")
        streamed = '{"prompt": "w5", "stream": true, "stop": "\\ud800", "max_tokens": 2}'
        assert_error(send("/v1/completions", streamed), 400, "stop")
        assert_error(send("/tokenize", '{"prompt": "\\ud83d"}'), 400, "prompt")
        # The kept-alive connection goes on serving after the refusals.
        ok = c.post("/v1/completions", json={"prompt": "a \U0001f600 b", "max_tokens": 2})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 2


# -- 4. a prompt list is that many requests -----------------------------------------------------------------------


def test_a_prompt_list_counts_as_that_many_requests(server):
    # Room for 12: 4 running + 8 queued.
    too_many = post(server, "/v1/completions", {"prompt": [f"w{5 + i}" for i in range(13)], "max_tokens": 1})
    assert_error(too_many, 400, "prompt", "too_many_sequences")
    big = {"prompt": [f"w{5 + i} w6" for i in range(10)], "max_tokens": 400, "ignore_eos": True}
    result: dict = {}
    worker = threading.Thread(target=lambda: result.update(r=post(server, "/v1/completions", big)))
    worker.start()
    time.sleep(0.5)
    refused = post(server, "/v1/completions", {"prompt": ["w7", "w8", "w9"], "max_tokens": 2})
    worker.join()
    error = assert_error(refused, 429, code="server_overloaded")
    assert int(refused.headers["retry-after"]) >= 1 and "10 requests" in error["message"]
    assert result["r"].status_code == 200 and len(result["r"].json()["choices"]) == 10


# -- 7. metrics --------------------------------------------------------------------------------------------------


def _metric(server: LiveServer, name: str) -> float:
    return server.metrics().get(name, 0.0)


def test_every_refusal_and_abort_is_counted(server):
    rejected = 'tokenfab:request_rejected_total{model_name="tiny",status="%s"}'
    before = {s: _metric(server, rejected % s) for s in ("400", "404")}
    assert_error(post(server, "/v1/completions", {"prompt": "w5", "logit_bias": {"5": 1}}), 400, "logit_bias")
    assert_error(post(server, "/v1/completions", {"prompt": "w5", "model": "gpt-4"}), 404, "model")
    assert_error(httpx.get(f"{server.url}/v1/nothing-here"), 404)
    assert _metric(server, rejected % "400") == before["400"] + 1
    assert _metric(server, rejected % "404") == before["404"] + 2

    aborted = 'tokenfab:request_success_total{finished_reason="abort",model_name="tiny"}'
    usd = "tokenfab:request_cost_usd_total"
    abort_before, usd_before = _metric(server, aborted), _metric(server, usd)
    with pytest.raises(httpx.TimeoutException):  # the client gives up: the server aborts the request
        httpx.post(f"{server.url}/v1/completions", timeout=0.3,
                   json={"prompt": "w5", "max_tokens": 1000, "ignore_eos": True, "n": 4})
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and _metric(server, aborted) == abort_before:
        time.sleep(0.1)
    assert _metric(server, aborted) == abort_before + 1
    assert _metric(server, usd) > usd_before  # its compute so far is in the cost totals


# -- 8. seeds ----------------------------------------------------------------------------------------------------


def test_seeded_siblings_do_not_repeat_other_seeds(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    kw = dict(model="tiny", prompt="w5 w6 w7", max_tokens=12, temperature=1.0, extra_body={"ignore_eos": True})
    three = sorted(client.completions.create(seed=7, n=3, **kw).choices, key=lambda c: c.index)
    alone7 = client.completions.create(seed=7, **kw).choices[0].text
    alone8 = client.completions.create(seed=8, **kw).choices[0].text
    alone9 = client.completions.create(seed=9, **kw).choices[0].text
    assert three[0].text == alone7  # choice 0 is the request's own seed
    assert three[1].text != alone8 and three[2].text != alone9  # siblings are not seed + i


# -- 10. leniency ------------------------------------------------------------------------------------------------


def test_common_client_input_is_accepted(server):
    chat = {"messages": [{"role": "user", "content": "w5 w6"}], "max_tokens": 3, "stream": None, "n": None,
            "store": False, "service_tier": "auto", "response_format": {"type": "text"},
            "metadata": {"session": "s1"}, "temperature": None, "stop": None, "seed": None, "ignore_eos": True}
    r = post(server, "/v1/chat/completions", chat)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    r = post(server, "/v1/completions", {"prompt": "w5", "max_tokens": None, "stream": None, "logprobs": None,
                                         "ignore_eos": True})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 16  # null max_tokens: the default
    refused = {"store": True, "service_tier": "flex", "response_format": {"type": "xml"}}
    for field, value in refused.items():
        param = "response_format.type" if field == "response_format" else field
        assert_error(post(server, "/v1/chat/completions", {**chat, field: value}), 400, param)
    # What sglang-router adds to every completion it forwards: its defaults are accepted, anything else named.
    sglang = {"prompt": "w5", "max_tokens": 2, "echo": False, "no_stop_trim": False, "ignore_eos": False,
              "skip_special_tokens": True, "return_hidden_states": False}
    assert post(server, "/v1/completions", sglang).status_code == 200
    for field in ("no_stop_trim", "return_hidden_states"):
        assert_error(post(server, "/v1/completions", {**sglang, field: True}), 400, field)


# -- 5. access -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def secured(model_path):
    os.environ["TOKENFAB_API_KEY"] = "sekret-key"
    try:
        live = LiveServer(model_path, "--allowed-origins", "http://app.example")
    finally:
        del os.environ["TOKENFAB_API_KEY"]
    yield live
    assert live.stop() == 0


def test_api_key_is_required_except_for_probes(secured):
    url = secured.url
    body = {"prompt": "w5", "max_tokens": 2}
    error = assert_error(httpx.post(f"{url}/v1/completions", json=body), 401, code="invalid_api_key")
    assert "Bearer" in error["message"]
    wrong = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer sekret-kez"})
    assert_error(wrong, 401, code="invalid_api_key")
    assert wrong.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.get(f"{url}/metrics"), 401)
    assert_error(httpx.get(f"{url}/v1/models"), 401)
    assert httpx.get(f"{url}/health").status_code == 200 and httpx.get(f"{url}/ready").status_code == 200
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="sekret-key", max_retries=0)
    assert client.completions.create(model="tiny", **body).usage.completion_tokens == 2
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{url}/v1", api_key="guess", max_retries=0).models.list()


def test_host_and_origin_checks(secured):
    url, auth = secured.url, {"Authorization": "Bearer sekret-key"}
    rebound = httpx.get(f"{url}/v1/models", headers={**auth, "Host": "attacker.example:8000"})
    assert_error(rebound, 400, code="invalid_host")  # DNS rebinding reaches a loopback server under another name
    foreign = httpx.get(f"{url}/v1/models", headers={**auth, "Origin": "http://attacker.example"})
    assert_error(foreign, 403, code="origin_not_allowed")
    same = httpx.get(f"{url}/v1/models", headers={**auth, "Origin": f"http://127.0.0.1:{secured.port}"})
    assert same.status_code == 200
    allowed = httpx.get(f"{url}/v1/models", headers={**auth, "Origin": "http://app.example"})
    assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == "http://app.example"
    preflight = httpx.options(f"{url}/v1/completions", headers={
        "Origin": "http://app.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type"})
    assert preflight.status_code == 200 and preflight.headers["access-control-allow-origin"] == "http://app.example"
    assert "access-control-allow-origin" not in httpx.get(f"{url}/health").headers  # no CORS without an Origin
    assert json.loads(httpx.get(f"{url}/docs", headers=auth).text)["error"]["type"] == "not_found_error"
