"""ASGI middleware in front of the routes: who may call (API key, Host, Origin), how much a request may send
(body size and time, and large bodies per second per client address), and what an unexpected failure looks like
(a 500 without internals, the connection kept).

Every refusal is an OpenAI-style JSON error, and every response of 400 or more (except a client's own 499) is
counted by status through `on_refusal`, whichever layer produced it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tokenfab.serve.errors import APIError

log = logging.getLogger("tokenfab.serve")
OPEN_PATHS = frozenset({"/health", "/ready"})
"""Routes a load balancer probes without credentials."""
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")

Scope = dict[str, Any]
Receive = Callable[[], Any]
Send = Callable[[dict[str, Any]], Any]


@dataclass(frozen=True, slots=True)
class GuardSettings:
    api_key: str | None
    allowed_hosts: frozenset[str] | None
    """Host header names accepted (None: any)."""
    allowed_origins: frozenset[str]
    """Browser origins allowed to call (with CORS headers); '*' for any. Same-origin calls are always allowed."""
    max_body_bytes: int
    body_timeout: float
    large_body_bytes_per_s: float
    """Body bytes beyond FREE_BODY_BYTES per request that one client address may send per second."""


FREE_BODY_BYTES = 64 * 2**10
"""The part of each body that costs nothing against the large-body budget: ordinary requests never touch it."""


class BodyBudget:
    """A token bucket of large-body bytes per client address (capacity: two seconds' worth, at least one largest
    body). Parsing a body costs
    the front end time in proportion to its size, so a client posting multi-megabyte bodies back to back would
    take the event loop from everyone; past its budget it gets 429 with the seconds until the bytes are back."""

    def __init__(self, rate: float, capacity: float, clock=time.monotonic) -> None:
        self.rate, self.capacity, self._clock = rate, capacity, clock
        self._buckets: dict[str, tuple[float, float]] = {}

    def take(self, client: str, size: int) -> int:
        """Charge a body of `size` bytes; 0 when allowed, else the seconds to wait (nothing is charged)."""
        cost = size - FREE_BODY_BYTES
        if cost <= 0:
            return 0
        now = self._clock()
        level, since = self._buckets.get(client, (self.capacity, now))
        level = min(self.capacity, level + (now - since) * self.rate)
        if cost > level:
            return max(1, math.ceil((cost - level) / self.rate))
        self._buckets[client] = (level - cost, now)
        if len(self._buckets) > 10_000:  # forget the clients whose bucket has refilled
            full = [c for c, (lv, t) in self._buckets.items() if lv + (now - t) * self.rate >= self.capacity]
            for c in full:
                del self._buckets[c]
        return 0


def default_hosts(bind: str, configured: tuple[str, ...]) -> frozenset[str] | None:
    """The Host names to accept: as configured ('*': any); by default, bound to loopback only loopback names (a
    web page cannot reach it through DNS rebinding), bound elsewhere any."""
    if configured:
        return None if "*" in configured else frozenset(h.lower() for h in configured)
    if bind in ("127.0.0.1", "::1", "localhost"):
        return frozenset(LOOPBACK_NAMES)
    return None


class Guard:
    """Body size and time limits, access checks and the error shield, around the app."""

    def __init__(self, app: Any, settings: GuardSettings, on_refusal: Callable[[int], None]) -> None:
        self.app = app
        self.settings = settings
        self.on_refusal = on_refusal
        rate = settings.large_body_bytes_per_s
        self.budget = BodyBudget(rate, max(settings.max_body_bytes, 2 * rate))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False
        status = 0

        async def tracked_send(message: dict[str, Any]) -> None:
            nonlocal started, status
            if message["type"] == "http.response.start":
                started, status = True, message["status"]
            await send(message)

        try:
            headers = _headers(scope)
            refusal = self._access(scope, headers)
            if refusal is None:
                receive, refusal = await self._read_body(scope, headers, receive)
            if refusal is not None:
                await _send_error(tracked_send, refusal)
            else:
                await self.app(scope, receive, tracked_send)
        except Exception:  # noqa: BLE001 - the last line: any failure becomes a 500 that names no internals
            reference = uuid.uuid4().hex[:12]
            log.exception("unexpected error (reference %s) on %s %s", reference, scope["method"], scope["path"])
            if started:
                raise  # the status is out; uvicorn closes the connection
            await _send_error(tracked_send, _internal(reference))
        finally:
            if status >= 400 and status != 499:
                self.on_refusal(status)

    def _access(self, scope: Scope, headers: dict[str, str]) -> APIError | None:
        s = self.settings
        host = headers.get("host", "")
        if s.allowed_hosts is not None and _hostname(host) not in s.allowed_hosts:
            return APIError(400, f"the Host header {host!r} is not allowed", code="invalid_host")
        origin = headers.get("origin")
        if origin is not None and not self._origin_allowed(origin, host):
            return APIError(403, f"requests from origin {origin!r} are not allowed", code="origin_not_allowed")
        if s.api_key is not None and scope["path"] not in OPEN_PATHS and scope["method"] != "OPTIONS":
            token = headers.get("authorization", "")
            scheme, _, key = token.partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), s.api_key.encode()):
                return APIError(
                    401,
                    "Incorrect API key provided. Send it as 'Authorization: Bearer <key>'.",
                    code="invalid_api_key",
                    headers={"WWW-Authenticate": "Bearer"},
                )
        return None

    def _origin_allowed(self, origin: str, host: str) -> bool:
        allowed = self.settings.allowed_origins
        return "*" in allowed or origin in allowed or origin.split("://", 1)[-1] == host

    async def _read_body(
        self, scope: Scope, headers: dict[str, str], receive: Receive
    ) -> tuple[Receive, APIError | None]:
        """Read the whole body up to the limit (FastAPI reads it whole anyway) and replay it to the app."""
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return receive, None
        limit = self.settings.max_body_bytes
        declared = headers.get("content-length")
        if declared is not None and declared.isdigit():
            if int(declared) > limit:
                return receive, _too_large(limit)
            if wait := self.budget.take(_client(scope), int(declared)):
                return receive, _body_rate(wait)
        chunks: list[bytes] = []
        size = 0
        try:
            async with asyncio.timeout(self.settings.body_timeout):
                while True:
                    message = await receive()
                    if message["type"] != "http.request":
                        return receive, APIError(400, "the client closed the connection", code="disconnected")
                    chunk = message.get("body", b"")
                    size += len(chunk)
                    if size > limit:
                        return receive, _too_large(limit)
                    chunks.append(chunk)
                    if not message.get("more_body", False):
                        break
            if declared is None and (wait := self.budget.take(_client(scope), size)):
                return receive, _body_rate(wait)
        except TimeoutError:
            return receive, APIError(
                408, f"the request body did not arrive within {self.settings.body_timeout:g} s", code="body_timeout"
            )
        body = b"".join(chunks)
        replayed = False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay, None


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


def _hostname(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _client(scope: Scope) -> str:
    client = scope.get("client")
    return client[0] if client else ""


def _body_rate(wait: int) -> APIError:
    return APIError(
        429,
        "this client has sent more large request bodies than the server parses per second; retry later",
        "rate_limit_exceeded",
        code="body_rate_exceeded",
        headers={"Retry-After": str(wait)},
    )


def _too_large(limit: int) -> APIError:
    return APIError(413, f"the request body is larger than {limit} bytes", code="request_too_large")


def _internal(reference: str) -> APIError:
    return APIError(
        500, f"the server failed to handle the request (reference {reference})", "internal_error", code="internal"
    )


async def _send_error(send: Send, error: APIError) -> None:
    response = error.response()
    await send({"type": "http.response.start", "status": response.status_code, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})
