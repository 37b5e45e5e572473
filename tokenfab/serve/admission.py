"""Admission: a bounded number of requests and prompt tokens in the server; beyond it, 429 with Retry-After.

The bound covers what runs (up to the engine's max_num_seqs) plus a waiting queue, so memory stays bounded
however many clients arrive. Retry-After is estimated from the recent rate at which requests finish.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

from tokenfab.serve.errors import APIError


@dataclass(slots=True)
class Ticket:
    """Room reserved for one request; releasing it twice is harmless."""

    tokens: int
    released: bool = False


class Admission:
    def __init__(self, max_requests: int, max_tokens: int, clock=time.monotonic) -> None:
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.requests = 0
        self.tokens = 0
        self.rejected = 0
        self._clock = clock
        self._finished: deque[float] = deque(maxlen=256)
        self.accepting = True

    def admit(self, tokens: int) -> Ticket:
        """Reserve room for a request of `tokens` prompt tokens (n > 1 counts n times), or raise 429/503."""
        if not self.accepting:
            raise APIError(
                503,
                "the server is shutting down and admits no new requests",
                "service_unavailable",
                code="shutting_down",
            )
        if self.requests + 1 > self.max_requests or (self.requests and self.tokens + tokens > self.max_tokens):
            self.rejected += 1
            raise APIError(
                429,
                f"the server is at capacity ({self.requests} requests, {self.tokens} prompt tokens "
                "queued or running); retry later",
                "rate_limit_exceeded",
                code="server_overloaded",
                headers={"Retry-After": str(self.retry_after())},
            )
        self.requests += 1
        self.tokens += tokens
        return Ticket(tokens)

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.requests -= 1
        self.tokens -= ticket.tokens
        self._finished.append(self._clock())

    def retry_after(self) -> int:
        """Seconds for the requests now admitted to finish at the recent finishing rate (1..60)."""
        now = self._clock()
        recent = [t for t in self._finished if now - t <= 30.0]
        if len(recent) < 2:
            return 1
        rate = len(recent) / max(now - recent[0], 1e-3)
        return max(1, min(60, math.ceil(self.requests / rate)))
