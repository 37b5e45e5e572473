"""Plain data of a benchmark run: what one request measured, and what one sweep point summarizes.

Times are seconds on the client's monotonic clock. A record is written for every request sent, failed ones
included (with `error` set to its kind), so error rates and partial runs are reported honestly.
"""

from __future__ import annotations

from dataclasses import dataclass, field

SCHEMA_VERSION = 1
"""Version of the JSON written by sweeps; bump on any incompatible change."""


@dataclass(slots=True)
class RequestRecord:
    start: float
    """When the request was sent."""
    end: float
    """When its last byte arrived (or it failed)."""
    prompt_tokens: int
    output_tokens: int = 0
    token_times: list[float] = field(default_factory=list)
    """Arrival time of each streamed chunk that carried output tokens, in order (first = first token)."""
    chunk_tokens: list[int] = field(default_factory=list)
    """Output tokens carried by each of those chunks (1 for most servers; more when a server batches them)."""
    error: str | None = None
    """None for success, else its kind: http_429, http_4xx, http_5xx, timeout, connection, protocol."""
    cached_tokens: int | None = None
    """Prompt tokens the server reported as prefix-cache hits (usage.prompt_tokens_details.cached_tokens)."""
    cost_usd: float | None = None
    """Server-reported usage.cost.usd, when the server reports it."""
    joules: float | None = None
    energy_source: str | None = None
    session: str | None = None
    turn: int = 0

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.start if self.token_times else None

    @property
    def e2el(self) -> float:
        return self.end - self.start


@dataclass(frozen=True, slots=True)
class SLO:
    """A latency target: a request meets it when both bounds hold."""

    ttft_s: float = 2.0
    tpot_s: float = 0.1
