"""Admission: a bounded number of requests and prompt tokens in the server; beyond it, 429 with Retry-After.

The bound covers what runs (up to the engine's max_num_seqs) plus a waiting queue, so memory stays bounded
however many clients arrive. A completions request with several prompts and n choices takes prompts x n of both.
Retry-After is the predicted time until the refused request would fit: the excess prompt tokens (and requests)
divided by the rate at which admitted ones drained while the server was busy. The rate is measured over busy time
only, so an idle spell does not make a full queue look fast to drain.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

from tokenfab.serve.errors import APIError

MAX_RETRY_AFTER = 600


@dataclass(slots=True)
class Ticket:
    """Room reserved for one request; releasing it twice is harmless."""

    tokens: int
    requests: int = 1
    released: bool = False


class Admission:
    def __init__(self, max_requests: int, max_tokens: int, clock=time.monotonic) -> None:
        self.max_requests = max_requests
        self.max_tokens = max_tokens
        self.requests = 0
        self.tokens = 0
        self.rejected = 0
        self._clock = clock
        self._busy = 0.0
        """Seconds with at least one request admitted, up to `_busy_since`."""
        self._busy_since: float | None = None
        self._drained: deque[tuple[float, int, int]] = deque(maxlen=512)
        """(busy seconds at release, tokens, requests) of recently released tickets."""
        self.accepting = True

    def admit(self, tokens: int, requests: int = 1) -> Ticket:
        """Reserve room for `requests` sequences of `tokens` prompt tokens in all, or raise 429/503."""
        if not self.accepting:
            raise APIError(
                503,
                "the server is shutting down and admits no new requests",
                "service_unavailable",
                code="shutting_down",
            )
        if requests > self.max_requests:
            raise APIError(
                400,
                f"the request has {requests} sequences (prompts x n); this server admits at most "
                f"{self.max_requests} at once",
                param="prompt",
                code="too_many_sequences",
            )
        over_requests = self.requests + requests - self.max_requests
        over_tokens = self.tokens + tokens - self.max_tokens if self.requests else 0
        if over_requests > 0 or over_tokens > 0:
            self.rejected += 1
            raise APIError(
                429,
                f"the server is at capacity ({self.requests} requests, {self.tokens} prompt tokens "
                "queued or running); retry later",
                "rate_limit_exceeded",
                code="server_overloaded",
                headers={"Retry-After": str(self.retry_after(max(over_tokens, 0), max(over_requests, 0)))},
            )
        if self.requests == 0:
            self._busy_since = self._clock()
        self.requests += requests
        self.tokens += tokens
        return Ticket(tokens, requests)

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.requests -= ticket.requests
        self.tokens -= ticket.tokens
        self._drained.append((self.busy_seconds(), ticket.tokens, ticket.requests))
        if self.requests == 0 and self._busy_since is not None:
            self._busy += self._clock() - self._busy_since
            self._busy_since = None

    def busy_seconds(self) -> float:
        since = self._busy_since
        return self._busy + (self._clock() - since if since is not None else 0.0)

    def retry_after(self, excess_tokens: int, excess_requests: int) -> int:
        """Seconds until `excess_tokens` prompt tokens and `excess_requests` requests have drained, at the
        rate they drained over recent busy time (1..MAX_RETRY_AFTER; 1 with nothing measured yet)."""
        if len(self._drained) < 2:
            return 1
        first, *after = self._drained
        span = self.busy_seconds() - first[0]
        if span <= 0:
            return 1
        token_rate = sum(t for _, t, _ in after) / span
        request_rate = sum(r for _, _, r in after) / span
        wait = max(excess_tokens / token_rate if token_rate else 0.0, excess_requests / request_rate)
        return max(1, min(MAX_RETRY_AFTER, math.ceil(wait)))
