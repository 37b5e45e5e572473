"""Sweeps: the same workload at several concurrencies (or rates), per system, into one versioned JSON document.

Each point is summarized as it finishes and the document is rewritten, so an interrupted sweep still leaves
every finished point on disk. With launchers, each system is started, swept and stopped in turn.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tokenfab.bench.client import Unreachable, probe
from tokenfab.bench.load import LoadPlan, run_requests, run_sessions
from tokenfab.bench.records import SCHEMA_VERSION, SLO, RequestRecord
from tokenfab.bench.scrape import deltas, scrape
from tokenfab.bench.stats import summarize
from tokenfab.bench.workloads import RequestSpec, SessionSpec
from tokenfab.platform import cpu_isa, machine
from tokenfab.version import __version__


@dataclass(frozen=True, slots=True)
class Workload:
    """A named workload, built once and replayed at every point: requests or sessions (not both)."""

    name: str
    params: dict
    requests: list[RequestSpec] = field(default_factory=list)
    sessions: list[SessionSpec] = field(default_factory=list)
    count_tokens: Callable[[str], int] | None = None

    @property
    def longest(self) -> int:
        """Prompt + output tokens of the longest request (0 for sessions: they grow as they run)."""
        return max((r.prompt_tokens + r.max_tokens for r in self.requests), default=0)


@dataclass(frozen=True, slots=True)
class SweepConfig:
    points: list[int] | list[float]
    """Concurrencies (closed loop) or request rates (open loop)."""
    open_loop: bool = False
    requests_per_point: int = 0
    """0: max(8, 2 x concurrency) requests (two waves), or all of the workload's requests in open loop."""
    warmup: int = 1
    max_duration_s: float | None = None
    price_per_hour: float = 0.09
    slo: SLO = SLO()
    power_watts: float | None = None
    """Client-side power model for systems that don't report energy (labelled modelled-client)."""
    request_timeout_s: float = 600.0
    burstiness: float = 1.0


def new_document(workload: Workload, config: SweepConfig, ceilings: dict | None) -> dict:
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "tokenfab-bench-sweep",
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "tokenfab_version": __version__,
        "machine": {**machine.describe(), **cpu_isa.describe(), **(ceilings or {})},
        "workload": {"name": workload.name, **workload.params},
        "slo": {"ttft_s": config.slo.ttft_s, "tpot_s": config.slo.tpot_s},
        "price_per_hour": config.price_per_hour,
        "power_watts_model": config.power_watts,
        "load": "open loop (rate, req/s)" if config.open_loop else "closed loop (concurrency)",
        "systems": [],
    }


async def sweep_system(
    url: str,
    system: str,
    workload: Workload,
    config: SweepConfig,
    doc: dict,
    out: Path | None,
    progress: Callable[[str, RequestRecord], None] | None = None,
) -> dict:
    """Sweep one running server; appends (and returns) its entry in doc, writing doc after every point."""
    entry: dict[str, Any] = {"system": system, "url": url, "status": "ok", "points": []}
    doc["systems"].append(entry)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=config.request_timeout_s) as client:
        try:
            card = await probe(client)
        except Unreachable as e:
            entry["status"] = f"failed: {e}"
            _write(doc, out)
            raise
        entry["model"] = card.get("id")
        entry["max_model_len"] = card.get("max_model_len")
        entry.update({k: card[k] for k in ("kernel_isa", "kernel_isa_reason", "batch_invariant") if k in card})
        limit = card.get("max_model_len")
        if limit and workload.longest > limit:
            entry["status"] = f"failed: workload needs {workload.longest} tokens; the model's context is {limit}"
            _write(doc, out)
            raise ValueError(entry["status"])
        offset = 0
        for point in config.points:
            records, seconds, counters, used = await _run_point(
                client, card["id"], workload, config, point, offset, system, progress
            )
            offset += used
            summary = summarize(
                records, price_per_hour=config.price_per_hour, slo=config.slo, power_watts=config.power_watts
            )
            entry["points"].append(
                {
                    "concurrency": None if config.open_loop else point,
                    "rate": point if config.open_loop else None,
                    "wall_s": seconds,
                    "summary": summary.as_dict(),
                    "server_counters": counters,
                }
            )
            _write(doc, out)
    return entry


async def _run_point(
    client: httpx.AsyncClient,
    model: str,
    workload: Workload,
    config: SweepConfig,
    point,
    offset: int,
    system: str,
    progress,
) -> tuple[list[RequestRecord], float, dict | None, int]:
    """One point on fresh requests (from `offset` on), so no point hits a prefix cached by an earlier one;
    returns its records, wall time, server counter deltas and how many workload items it used."""
    plan = LoadPlan(
        concurrency=None if config.open_loop else int(point),
        rate=float(point) if config.open_loop else None,
        warmup=config.warmup,
        max_duration_s=config.max_duration_s,
        request_timeout_s=config.request_timeout_s,
        burstiness=config.burstiness,
    )
    hook = (lambda r: progress(system, r)) if progress else None
    before = await scrape(client)
    start = time.monotonic()
    n = requests_for(config, point, workload)
    if workload.sessions:
        assert workload.count_tokens is not None, "session workloads count tokens"
        sessions = _cycle(workload.sessions, offset, n)
        records = await run_sessions(client, model, sessions, plan, workload.count_tokens, hook)
    else:
        specs = _cycle(workload.requests, offset, n + config.warmup)
        records = await run_requests(client, model, specs, plan, hook)
        n += config.warmup
    seconds = time.monotonic() - start
    return records, seconds, deltas(before, await scrape(client)), n


def requests_for(config: SweepConfig, point, workload: Workload | None = None) -> int:
    """Requests (or sessions) one point sends, warm-up excluded."""
    if config.requests_per_point:
        return config.requests_per_point
    if workload is not None and workload.sessions:
        return max(4, 2 * int(point))
    if config.open_loop:
        return len(workload.requests) if workload is not None else 64
    return max(8, 2 * int(point))


def items_needed(config: SweepConfig, sessions: bool) -> int:
    """Workload items a whole sweep uses when every point takes fresh ones."""
    if sessions:
        return sum(config.requests_per_point or max(4, 2 * int(p)) for p in config.points)
    return sum(requests_for(config, p) + config.warmup for p in config.points)


def _cycle(items: list, offset: int, n: int) -> list:
    """n items from offset on, wrapping around only if the workload is shorter than the sweep."""
    return [items[(offset + i) % len(items)] for i in range(n)]


def _write(doc: dict, out: Path | None) -> None:
    if out is None:
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(out)
