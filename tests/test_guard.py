"""The ASGI guard in front of the routes, driven directly: an unexpected failure is a 500 naming no internals and
counted; the large-body budget refills at its rate; Host names are parsed and the loopback default applies."""

from __future__ import annotations

import asyncio
import json

from tokenfab.serve.guard import FREE_BODY_BYTES, BodyBudget, Guard, GuardSettings, default_hosts

SETTINGS = GuardSettings(api_key=None, allowed_hosts=frozenset({"localhost"}), allowed_origins=frozenset(),
                         max_body_bytes=2**20, body_timeout=5.0, large_body_bytes_per_s=2**20)


def call(app, method: str = "POST", body: bytes = b"{}", host: str = "localhost:8000") -> tuple[int, dict, list]:
    """Run one request through Guard(app); (status, JSON body, statuses counted as refusals)."""
    refusals: list[int] = []
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": "/v1/completions", "client": ("10.0.0.1", 5000),
             "headers": [(b"host", host.encode()), (b"content-length", str(len(body)).encode())]}
    asyncio.run(Guard(app, SETTINGS, refusals.append)(scope, receive, send))
    status = sent[0]["status"]
    return status, json.loads(b"".join(m.get("body", b"") for m in sent[1:])), refusals


def test_an_unexpected_failure_is_a_500_without_internals():
    async def broken(scope, receive, send):
        await receive()
        raise TypeError("secret internal detail at /srv/app.py:42")

    status, body, refusals = call(broken)
    assert status == 500 and refusals == [500]
    assert body["error"]["type"] == "internal_error" and "secret" not in body["error"]["message"]
    assert "reference" in body["error"]["message"]


def test_the_body_reaches_the_app_whole_and_a_wrong_host_does_not():
    async def echo(scope, receive, send):
        message = await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": json.dumps({"n": len(message["body"])}).encode()})

    assert call(echo, body=b'{"prompt": "x"}')[:2] == (200, {"n": 15})
    status, body, refusals = call(echo, host="attacker.example")
    assert status == 400 and body["error"]["code"] == "invalid_host" and refusals == [400]
    assert call(echo, body=b"x" * (2**20 + 1))[0] == 413


def test_the_large_body_budget_refills_at_its_rate():
    now = [0.0]
    budget = BodyBudget(rate=1000.0, capacity=5000.0, clock=lambda: now[0])
    assert budget.take("a", FREE_BODY_BYTES) == 0  # the free part never counts
    assert budget.take("a", FREE_BODY_BYTES + 5000) == 0  # the whole bucket
    assert budget.take("a", FREE_BODY_BYTES + 2500) == 3  # 2,500 bytes at 1,000/s
    assert budget.take("b", FREE_BODY_BYTES + 5000) == 0  # each client address has its own
    now[0] = 2.5
    assert budget.take("a", FREE_BODY_BYTES + 2500) == 0


def test_default_hosts():
    assert default_hosts("127.0.0.1", ()) == {"localhost", "127.0.0.1", "::1"}
    assert default_hosts("0.0.0.0", ()) is None
    assert default_hosts("127.0.0.1", ("*",)) is None
    assert default_hosts("127.0.0.1", ("API.example",)) == {"api.example"}
