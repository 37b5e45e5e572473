"""Server-side counters from a Prometheus /metrics endpoint, as deltas over a benchmark point."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

KEYWORDS = (
    "prefix_cache",
    "cost_usd",
    "energy_joules",
    "preemption",
    "busy_seconds",
    "generation_tokens",
    "prompt_tokens",
    "spec_",
)


async def scrape(client: httpx.AsyncClient) -> dict[str, float] | None:
    """Counter samples whose names look useful to a cost/latency report; None when there is no /metrics."""
    try:
        r = await client.get("/metrics", timeout=10)
    except httpx.HTTPError:
        return None
    if r.status_code != 200:
        return None
    values: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(r.text):
            if family.type != "counter" or not any(k in family.name for k in KEYWORDS):
                continue
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    values[sample.name] = values.get(sample.name, 0.0) + sample.value
    except ValueError:
        return None
    return values


def deltas(before: dict[str, float] | None, after: dict[str, float] | None) -> dict[str, float] | None:
    if before is None or after is None:
        return None
    return {name: after[name] - before.get(name, 0.0) for name in sorted(after)}
