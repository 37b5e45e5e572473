"""The metric math of a benchmark run: pure functions from RequestRecords to the numbers a report prints.

Definitions follow vLLM's `benchmark_serving` (which InferenceX reuses), so our figures line up with published
ones: TTFT = first token − send; TPOT = (E2EL − TTFT) / (output tokens − 1), which leaves the first token out
because its time is prefill, already counted in TTFT; ITL = every gap between streamed chunks; E2EL = last byte −
send. Throughputs count only completed requests' tokens, over the whole run's duration, failures included in it.

Two choices vLLM leaves open are made here, and stated so reports can be read:

- A chunk that carries k > 1 tokens (a server that batches its stream) contributes its gap as k ITL values of
  gap / k each. Counting it once would hide that k tokens arrived together and skew the ITL percentiles toward
  the large gaps; k equal shares keep the ITL count equal to the tokens after the first chunk and the ITL mean
  comparable with TPOT. The first chunk contributes no ITL, however many tokens it carries: its gap is TTFT.
- The goodput fraction is taken over requests *sent*: a failed request has not met the SLO, and dividing by
  completed requests only would let a server that drops half its load pass a 90 % bar.

A rate over zero time is undefined: it is None, except that zero tokens (or requests) is a rate of 0 over any
duration, so an empty or all-failed run reads as 0 tok/s rather than as missing.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

from tokenfab.bench.records import SLO, RequestRecord

Percentiles = dict[str, float | None]
"""{"mean": …, "p50": …, …} in the values' own unit; every value None when there were no values."""

DEFAULT_PS: tuple[float, ...] = (50, 90, 99)
MODELLED_CLIENT = "modelled-client"
"""energy_source of J/token modelled on the client from an assumed constant power draw."""


def percentiles(values: Iterable[float], ps: Sequence[float] = DEFAULT_PS) -> Percentiles:
    """Mean and percentiles with linear interpolation between order statistics (numpy.percentile's default)."""
    for p in ps:
        if not 0 <= p <= 100:
            raise ValueError(f"percentile must be in [0, 100], got {p}")
    xs = sorted(values)
    out: Percentiles = {"mean": math.fsum(xs) / len(xs) if xs else None}
    for p in ps:
        out[f"p{p:g}"] = _interpolate(xs, p) if xs else None
    return out


def _interpolate(xs: list[float], p: float) -> float:
    rank = p / 100 * (len(xs) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (rank - lo)


def tpot(record: RequestRecord) -> float | None:
    """Time per output token after the first; None for a request with at most one token or none streamed."""
    ttft = record.ttft
    if ttft is None or record.output_tokens <= 1:
        return None
    return (record.e2el - ttft) / (record.output_tokens - 1)


def itl(record: RequestRecord) -> list[float]:
    """Inter-token latencies: each chunk's gap to the previous one, split evenly over the k tokens it carries."""
    out: list[float] = []
    for i in range(1, len(record.token_times)):
        k = record.chunk_tokens[i] if i < len(record.chunk_tokens) else 1
        k = max(k, 1)  # a chunk is only recorded when it carries tokens; guard against a malformed count
        out.extend([(record.token_times[i] - record.token_times[i - 1]) / k] * k)
    return out


def meets_slo(record: RequestRecord, slo: SLO) -> bool:
    """Completed, first token in time, and (when there is a second token) decode fast enough."""
    ttft = record.ttft
    if not record.ok or ttft is None or ttft > slo.ttft_s:
        return False
    t = tpot(record)
    return t is None or t <= slo.tpot_s


@dataclass(frozen=True, slots=True)
class Summary:
    """One benchmark run (one sweep point) summarized; times in seconds, rates per second of `duration_s`."""

    sent: int
    completed: int
    failed: dict[str, int]
    """Failed requests by error kind (http_429, timeout, …)."""
    duration_s: float
    input_tokens: int
    """Prompt tokens of completed requests."""
    output_tokens: int
    """Output tokens of completed requests."""
    input_tok_s: float | None
    output_tok_s: float | None
    total_tok_s: float | None
    request_rate: float | None
    """Completed requests per second."""
    ttft_s: Percentiles
    returning_ttft_s: Percentiles
    """TTFT of agentic sessions' later turns (a session coming back after its think time; empty otherwise)."""
    tpot_s: Percentiles
    itl_s: Percentiles
    e2el_s: Percentiles
    interactivity: float | None
    """1 / median TPOT, in tok/s/user; None when no request had a second token."""
    prefix_cache_hit_rate: float | None
    """Cached / prompt tokens over requests whose server reported cached_tokens; None when none did."""
    slo: SLO | None
    goodput_requests: int | None
    """Requests meeting the SLO; None when no SLO was given."""
    goodput_fraction: float | None
    """goodput_requests / sent (failures count as misses)."""
    goodput_request_rate: float | None
    price_per_hour: float | None
    """The $/device-hour the cost figures assume, stated with them."""
    usd_per_mtok_output: float | None
    usd_per_mtok_total: float | None
    server_usd: float | None
    """Sum of server-reported usage.cost.usd; None when no record carried it."""
    server_joules: float | None
    power_watts: float | None
    """The constant power the client-modelled J/token assumes; None when not modelled."""
    energy_source: str | tuple[str, ...] | None
    """Where the joules came from: one source, or the sorted set when records disagree."""
    joules_per_token_output: float | None
    joules_per_token_total: float | None

    def as_dict(self) -> dict[str, object]:
        """Plain JSON-ready values (copies, so the caller may edit them)."""
        return {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}


def _jsonable(value: object) -> object:
    if isinstance(value, SLO):
        return {"ttft_s": value.ttft_s, "tpot_s": value.tpot_s}
    if isinstance(value, dict):
        return dict(value)
    if isinstance(value, tuple):
        return list(value)
    return value


def summarize(
    records: Sequence[RequestRecord],
    duration: float | None = None,
    price_per_hour: float | None = None,
    slo: SLO | None = None,
    power_watts: float | None = None,
) -> Summary:
    """Summarize one run; `duration` defaults to last end − first start over all records, failed ones too."""
    for name, v in (("duration", duration), ("price_per_hour", price_per_hour), ("power_watts", power_watts)):
        if v is not None and v < 0:
            raise ValueError(f"{name} must be >= 0, got {v}")
    dur = duration if duration is not None else _span(records)
    done = [r for r in records if r.ok]
    n_in = sum(r.prompt_tokens for r in done)
    n_out = sum(r.output_tokens for r in done)
    tpots = [t for r in done if (t := tpot(r)) is not None]
    tpot_s = percentiles(tpots)
    good = sum(meets_slo(r, slo) for r in records) if slo is not None else None
    energy = _energy(records, dur, n_in, n_out, power_watts)
    return Summary(
        sent=len(records),
        completed=len(done),
        failed=dict(Counter(r.error for r in records if r.error is not None)),
        duration_s=dur,
        input_tokens=n_in,
        output_tokens=n_out,
        input_tok_s=_rate(n_in, dur),
        output_tok_s=_rate(n_out, dur),
        total_tok_s=_rate(n_in + n_out, dur),
        request_rate=_rate(len(done), dur),
        ttft_s=percentiles(t for r in done if (t := r.ttft) is not None),
        returning_ttft_s=percentiles(t for r in done if r.turn > 0 and (t := r.ttft) is not None),
        tpot_s=tpot_s,
        itl_s=percentiles(x for r in done for x in itl(r)),
        e2el_s=percentiles(r.e2el for r in done),
        interactivity=_inverse(tpot_s["p50"]),
        prefix_cache_hit_rate=_prefix_hit_rate(records),
        slo=slo,
        goodput_requests=good,
        goodput_fraction=good / len(records) if good is not None and records else None,
        goodput_request_rate=_rate(good, dur) if good is not None else None,
        price_per_hour=price_per_hour,
        usd_per_mtok_output=usd_per_mtok(price_per_hour, _rate(n_out, dur)),
        usd_per_mtok_total=usd_per_mtok(price_per_hour, _rate(n_in + n_out, dur)),
        server_usd=_sum_reported(r.cost_usd for r in records),
        server_joules=energy[0],
        power_watts=power_watts if energy[1] == MODELLED_CLIENT else None,
        energy_source=energy[1],
        joules_per_token_output=energy[2],
        joules_per_token_total=energy[3],
    )


def usd_per_mtok(price_per_hour: float | None, tok_s: float | None) -> float | None:
    """$ per million tokens at a device price and a throughput; None when either is missing or zero."""
    if price_per_hour is None or not tok_s:
        return None
    return price_per_hour * 1e6 / (tok_s * 3600)


def _span(records: Sequence[RequestRecord]) -> float:
    if not records:
        return 0.0
    return max(r.end for r in records) - min(r.start for r in records)


def _rate(count: float, duration: float) -> float | None:
    if count == 0:
        return 0.0
    return count / duration if duration > 0 else None


def _inverse(x: float | None) -> float | None:
    return 1 / x if x else None


def _sum_reported(values: Iterable[float | None]) -> float | None:
    reported = [v for v in values if v is not None]
    return math.fsum(reported) if reported else None


def _prefix_hit_rate(records: Sequence[RequestRecord]) -> float | None:
    reporting = [r for r in records if r.cached_tokens is not None]
    prompt = sum(r.prompt_tokens for r in reporting)
    if not prompt:
        return None
    return sum(r.cached_tokens or 0 for r in reporting) / prompt


def _energy(
    records: Sequence[RequestRecord], duration: float, n_in: int, n_out: int, power_watts: float | None
) -> tuple[float | None, str | tuple[str, ...] | None, float | None, float | None]:
    """(server joules, source, J/output token, J/token) — measured by the server when any record says so.

    Server joules of failed requests are charged to the completed requests' tokens, as a device-hour price is:
    the energy was spent either way. The token count is over the records that report joules, so a run where
    only some responses carried them is not divided by tokens whose energy was never counted.
    """
    server = _sum_reported(r.joules for r in records)
    if server is not None:
        done = [r for r in records if r.ok and r.joules is not None]
        out = sum(r.output_tokens for r in done)
        total = out + sum(r.prompt_tokens for r in done)
        return server, _sources(records), _per(server, out), _per(server, total)
    if power_watts is not None and duration > 0:
        joules = power_watts * duration
        return None, MODELLED_CLIENT, _per(joules, n_out), _per(joules, n_in + n_out)
    return None, _sources(records), None, None


def _per(joules: float, tokens: int) -> float | None:
    return joules / tokens if tokens else None


def _sources(records: Sequence[RequestRecord]) -> str | tuple[str, ...] | None:
    found = sorted({r.energy_source for r in records if r.energy_source is not None})
    if not found:
        return None
    return found[0] if len(found) == 1 else tuple(found)


def goodput_rate(points: Iterable[tuple[float, Summary]], fraction: float = 0.9) -> float | None:
    """Highest measured request rate among sweep points where ≥ `fraction` of requests met the SLO.

    The measured rate, not the offered one: a sweep may be by concurrency, and a server that falls behind an
    offered Poisson rate only served what it served.
    """
    best = best_within_slo([{"summary": s.as_dict()} for _, s in points], "request_rate", fraction)
    return None if best is None else best["summary"]["request_rate"]


def best_within_slo(points: Sequence[dict], key: str, fraction: float = 0.9) -> dict | None:
    """Of sweep points in their JSON form ({"summary": {...}, ...}), the one with the largest summary[key]
    among those where >= `fraction` of requests met the SLO; None when no point qualifies."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    good = [
        p
        for p in points
        if (g := p["summary"].get("goodput_fraction")) is not None
        and g >= fraction
        and p["summary"].get(key) is not None
    ]
    return max(good, key=lambda p: p["summary"][key], default=None)


def pareto_front(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point dominates, maximizing both (tok/s/user, throughput per device).

    A point dominates another when it is >= in both coordinates and > in at least one, so identical points do
    not dominate each other and are all kept. Sorted by x (then index), the order a frontier line is drawn in.
    """
    if any(math.isnan(c) for p in points for c in p):
        raise ValueError("pareto_front got NaN; drop points with a missing metric first")
    front = [i for i, p in enumerate(points) if not any(_dominates(q, p) for q in points)]
    return sorted(front, key=lambda i: (points[i][0], i))


def _dominates(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] >= b[0] and a[1] >= b[1] and (a[0] > b[0] or a[1] > b[1])
