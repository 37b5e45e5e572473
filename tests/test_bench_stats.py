"""Benchmark metric math on synthetic timestamps; every expected value is worked out by hand beside it."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest

from tokenfab.bench.records import SLO, RequestRecord
from tokenfab.bench.stats import (MODELLED_CLIENT, Summary, goodput_rate, itl, meets_slo, pareto_front, percentiles,
                                  summarize, tpot, usd_per_mtok)


def rec(
    start: float,
    times: list[float],
    *,
    out: int | None = None,
    end: float | None = None,
    prompt: int = 10,
    chunks: list[int] | None = None,
    **kw: object,
) -> RequestRecord:
    """A record whose output count and end default to what its chunks say."""
    chunks = chunks if chunks is not None else [1] * len(times)
    return RequestRecord(
        start=start,
        end=end if end is not None else (times[-1] if times else start),
        prompt_tokens=prompt,
        output_tokens=out if out is not None else sum(chunks),
        token_times=times,
        chunk_tokens=chunks,
        **kw,  # type: ignore[arg-type]
    )


def approx(x: float) -> object:
    return pytest.approx(x, rel=1e-12, abs=1e-12)


def test_per_request_ttft_tpot_itl_e2el() -> None:
    r = rec(0.0, [0.5, 0.6, 0.8])
    assert r.ttft == approx(0.5)
    assert tpot(r) == approx(0.15)  # (0.8 - 0.5) / (3 - 1)
    assert itl(r) == [approx(0.1), approx(0.2)]  # 0.6 - 0.5, 0.8 - 0.6
    assert r.e2el == approx(0.8)


def test_tpot_excludes_first_token_and_uses_end() -> None:
    # Slow prefill: first token at 1.0, then 4 more tokens, last byte at 1.4.
    r = rec(0.0, [1.0, 1.1, 1.2, 1.3, 1.4])
    assert tpot(r) == approx(0.1)  # (1.4 - 1.0) / 4, not 1.4 / 5 = 0.28
    # The final usage chunk arrives after the last token: E2EL (to end) is used, as vLLM does.
    late = rec(0.0, [0.5, 0.6, 0.8], end=0.9)
    assert tpot(late) == approx(0.2)  # (0.9 - 0.5) / 2
    assert tpot(rec(0.0, [0.5])) is None  # one token: no decode
    assert tpot(rec(0.0, [], out=0, end=1.0)) is None


def test_itl_pools_two_requests_and_splits_multi_token_chunk() -> None:
    a = rec(0.0, [0.5, 0.6, 0.8])  # ITLs 0.1, 0.2
    # b's first chunk carries 2 tokens (no ITL: its gap is TTFT); the second carries 3 over a 0.3 gap
    # -> 0.1 three times; the third carries 1 over 0.1 -> 0.1. Output 2 + 3 + 1 = 6.
    b = rec(1.0, [1.2, 1.5, 1.6], chunks=[2, 3, 1])
    assert itl(b) == [approx(0.1)] * 4
    s = summarize([a, b])
    # Pooled: [0.1, 0.2, 0.1, 0.1, 0.1, 0.1]; sorted [0.1 x5, 0.2], n = 6.
    # mean 0.7 / 6; p50 rank 2.5 -> 0.1; p90 rank 4.5 -> 0.1 + 0.5*0.1 = 0.15; p99 rank 4.95 -> 0.195.
    assert s.itl_s == {"mean": approx(0.7 / 6), "p50": approx(0.1), "p90": approx(0.15), "p99": approx(0.195)}
    assert s.output_tokens == 9  # 3 + 6


def test_percentiles_by_hand_and_against_numpy() -> None:
    # [1, 2, 3, 4]: p50 rank 1.5 -> 2.5; p90 rank 2.7 -> 3.7; p99 rank 2.97 -> 3.97; mean 2.5.
    assert percentiles([4, 1, 3, 2]) == {"mean": 2.5, "p50": 2.5, "p90": approx(3.7), "p99": approx(3.97)}
    rng = random.Random(7)
    xs = [rng.expovariate(3.0) for _ in range(101)]
    ps = (0, 12.5, 50, 90, 99, 100)
    got = percentiles(xs, ps)
    assert list(got) == ["mean", "p0", "p12.5", "p50", "p90", "p99", "p100"]
    assert got["mean"] == approx(float(np.mean(xs)))
    for p in ps:
        assert got[f"p{p:g}"] == approx(float(np.percentile(xs, p)))


def test_percentiles_empty_single_and_invalid() -> None:
    assert percentiles([]) == {"mean": None, "p50": None, "p90": None, "p99": None}
    assert percentiles([0.3]) == {"mean": 0.3, "p50": 0.3, "p90": 0.3, "p99": 0.3}
    with pytest.raises(ValueError):
        percentiles([1.0], ps=(101,))


def test_throughput_and_duration() -> None:
    a = rec(0.0, [0.5, 2.0], prompt=100, out=10, end=2.0)
    b = rec(1.0, [1.5, 4.0], prompt=50, out=20, end=4.0)
    s = summarize([a, b])
    # Duration 4 - 0 = 4: in 150/4, out 30/4, total 180/4, 2 requests / 4.
    assert s.duration_s == 4.0
    assert (s.input_tok_s, s.output_tok_s, s.total_tok_s, s.request_rate) == (37.5, 7.5, 45.0, 0.5)
    s = summarize([a, b], duration=10.0)
    assert (s.input_tok_s, s.output_tok_s, s.total_tok_s, s.request_rate) == (15.0, 3.0, 18.0, 0.2)
    # A failed request stretches the run (its time was spent) but adds no tokens: 180 / 5 = 36.
    failed = RequestRecord(start=0.0, end=5.0, prompt_tokens=1000, error="timeout")
    assert summarize([a, b, failed]).total_tok_s == 36.0


def test_failed_requests_counted_by_kind_and_excluded_from_latency() -> None:
    good = rec(0.0, [0.5, 0.6, 0.8], prompt=7)
    partial = rec(0.0, [3.0, 9.0], end=9.5, error="timeout")  # streamed a little, then timed out
    r429 = [RequestRecord(start=0.0, end=0.01, prompt_tokens=7, error="http_429") for _ in range(2)]
    s = summarize([good, partial, *r429])
    assert (s.sent, s.completed, s.failed) == (4, 1, {"timeout": 1, "http_429": 2})
    assert s.ttft_s["p99"] == approx(0.5)  # the timed-out 3.0 is not in it
    assert s.e2el_s["mean"] == approx(0.8)
    assert s.itl_s["p99"] == approx(0.199)  # [0.1, 0.2]: rank 0.99 -> 0.199; the 6.0 gap is not in it
    assert s.tpot_s["mean"] == approx(0.15)
    assert (s.input_tokens, s.output_tokens) == (7, 3)
    assert s.duration_s == 9.5  # span over all records


def test_goodput_counts_requests_meeting_slo() -> None:
    slo = SLO(ttft_s=1.0, tpot_s=0.1)
    records = [
        rec(0.0, [0.5, 0.55, 0.6]),  # TTFT 0.5, TPOT 0.05: meets
        rec(0.0, [1.5, 1.6]),  # TTFT 1.5: misses
        rec(0.0, [0.2, 0.6], out=3, end=1.0),  # TPOT (1.0 - 0.2) / 2 = 0.4: misses
        rec(0.0, [0.3], end=3.0),  # one token, TTFT 0.3: meets whatever its tail
        rec(0.0, [1.0]),  # TTFT exactly 1.0: meets (<=)
        RequestRecord(start=0.0, end=0.1, prompt_tokens=5, error="http_5xx"),  # failed: misses
    ]
    assert [meets_slo(r, slo) for r in records] == [True, False, False, True, True, False]
    s = summarize(records, slo=slo)
    # 3 of 6 sent; duration 3.0 - 0 -> 3 / 3 = 1.0 good requests per second.
    assert (s.goodput_requests, s.goodput_fraction, s.goodput_request_rate) == (3, 0.5, 1.0)
    assert s.slo == slo
    no_slo = summarize(records)
    assert (no_slo.goodput_requests, no_slo.goodput_fraction, no_slo.goodput_request_rate) == (None, None, None)


def test_usd_per_mtok() -> None:
    # $0.09/h at 100 tok/s: 0.09 * 1e6 / (100 * 3600) = 0.25 $/Mtok.
    assert usd_per_mtok(0.09, 100.0) == approx(0.25)
    r = rec(0.0, [1.0, 10.0], prompt=1000, out=1000, end=10.0)  # 100 tok/s in, 100 out, 200 total
    s = summarize([r], price_per_hour=0.09)
    assert s.usd_per_mtok_output == approx(0.25)
    assert s.usd_per_mtok_total == approx(0.125)  # 0.09e6 / (200 * 3600)
    assert s.price_per_hour == 0.09
    assert summarize([r]).usd_per_mtok_output is None
    assert usd_per_mtok(0.09, 0.0) is None and usd_per_mtok(0.09, None) is None


def test_joules_per_token_from_server() -> None:
    m = {"energy_source": "measured"}
    records = [
        rec(0.0, [0.5, 1.0], prompt=100, out=50, joules=30.0, cost_usd=0.001, **m),
        rec(0.0, [0.5, 1.0], prompt=100, out=50, joules=20.0, cost_usd=0.002, **m),
        RequestRecord(start=0.0, end=1.0, prompt_tokens=100, error="timeout", joules=10.0, **m),
    ]
    s = summarize(records, power_watts=999.0)  # server joules win over the model
    assert s.server_joules == 60.0  # 30 + 20 + 10: the failed request's energy was spent too
    assert s.joules_per_token_output == approx(0.6)  # 60 / (50 + 50)
    assert s.joules_per_token_total == approx(0.2)  # 60 / (100 + 50 + 100 + 50)
    assert s.energy_source == "measured"
    assert s.power_watts is None
    assert s.server_usd == approx(0.003)
    mixed = [*records[:1], dataclasses.replace(records[1], energy_source="modelled")]
    assert summarize(mixed).energy_source == ("measured", "modelled")
    assert summarize(mixed).as_dict()["energy_source"] == ["measured", "modelled"]


def test_joules_per_token_modelled_from_power() -> None:
    r = rec(0.0, [1.0, 10.0], prompt=1000, out=500, end=10.0)
    s = summarize([r], power_watts=50.0)
    # 50 W * 10 s = 500 J: 500 / 500 output tokens = 1.0; 500 / 1500 tokens = 1/3.
    assert s.joules_per_token_output == approx(1.0)
    assert s.joules_per_token_total == approx(1 / 3)
    assert (s.energy_source, s.server_joules, s.power_watts) == (MODELLED_CLIENT, None, 50.0)
    none = summarize([r])
    assert (none.joules_per_token_output, none.energy_source, none.server_usd) == (None, None, None)


def test_interactivity_and_prefix_hit_rate() -> None:
    records = [
        rec(0.0, [0.5, 0.6], prompt=100, cached_tokens=50),  # TPOT 0.1
        rec(0.0, [0.5, 0.75], prompt=100, cached_tokens=0),  # TPOT 0.25
        rec(0.0, [0.5, 0.55], prompt=200),  # TPOT 0.05; no cache report
    ]
    s = summarize(records)
    assert s.interactivity == approx(10.0)  # 1 / median(0.05, 0.1, 0.25)
    assert s.prefix_cache_hit_rate == 0.25  # 50 / (100 + 100), the unreported request left out
    assert summarize(records[2:]).prefix_cache_hit_rate is None
    assert summarize([rec(0.0, [0.5])]).interactivity is None  # no request had a second token


def test_degenerate_runs_never_divide_by_zero() -> None:
    empty = summarize([], slo=SLO(), price_per_hour=1.0, power_watts=10.0)
    assert (empty.sent, empty.completed, empty.duration_s) == (0, 0, 0.0)
    assert (empty.output_tok_s, empty.request_rate, empty.goodput_request_rate) == (0.0, 0.0, 0.0)
    assert (empty.goodput_fraction, empty.usd_per_mtok_output, empty.joules_per_token_output) == (None, None, None)
    assert empty.ttft_s == {"mean": None, "p50": None, "p90": None, "p99": None}
    failed = summarize([RequestRecord(start=0.0, end=2.0, prompt_tokens=9, error="connection")])
    assert (failed.completed, failed.total_tok_s, failed.interactivity) == (0, 0.0, None)
    # Tokens in zero time: the rate is undefined, not infinite.
    instant = summarize([rec(0.0, [0.0, 0.0])], price_per_hour=1.0, power_watts=10.0)
    assert (instant.duration_s, instant.output_tok_s, instant.request_rate) == (0.0, None, None)
    assert (instant.usd_per_mtok_total, instant.joules_per_token_total) == (None, None)
    json.dumps(instant.as_dict())
    with pytest.raises(ValueError):
        summarize([], duration=-1.0)


def test_summary_is_frozen_and_as_dict_is_plain_json() -> None:
    s = summarize([rec(0.0, [0.5, 0.6, 0.8])], slo=SLO(ttft_s=2.0, tpot_s=0.2))  # TPOT 0.15: meets
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.sent = 5  # type: ignore[misc]
    d = s.as_dict()
    assert d["slo"] == {"ttft_s": 2.0, "tpot_s": 0.2}
    assert d["tpot_s"] == {"mean": approx(0.15), "p50": approx(0.15), "p90": approx(0.15), "p99": approx(0.15)}
    assert set(d) == {f.name for f in dataclasses.fields(Summary)}
    d["ttft_s"]["p50"] = 99.0  # type: ignore[index]
    assert s.ttft_s["p50"] == approx(0.5)
    assert json.loads(json.dumps(d))["goodput_requests"] == 1


def test_pareto_front_keeps_ties_drops_dominated_sorted_by_x() -> None:
    points = [(3.0, 2.0), (2.0, 8.0), (1.5, 7.0), (1.0, 10.0), (2.0, 8.0), (0.5, 10.0)]
    # (1.5, 7) is dominated by (2, 8); (0.5, 10) by (1, 10) (equal y, larger x); the two (2, 8) tie and stay.
    assert pareto_front(points) == [3, 1, 4, 0]  # x = 1, 2, 2, 3
    assert pareto_front([]) == []
    assert pareto_front([(1.0, 1.0)]) == [0]
    with pytest.raises(ValueError):
        pareto_front([(float("nan"), 1.0)])


def test_goodput_rate_picks_highest_qualifying_rate() -> None:
    base = summarize([])

    def point(offered: float, rate: float, fraction: float | None) -> tuple[float, Summary]:
        return offered, dataclasses.replace(base, request_rate=rate, goodput_fraction=fraction)

    sweep = [point(1, 1.0, 1.0), point(2, 1.9, 0.95), point(4, 3.5, 0.9), point(8, 5.0, 0.6)]
    assert goodput_rate(sweep) == 3.5  # 0.9 qualifies (>=); 5.0 does not at 0.6
    assert goodput_rate(sweep, fraction=0.95) == 1.9
    assert goodput_rate(sweep, fraction=0.99) == 1.0
    assert goodput_rate(sweep[3:]) is None
    assert goodput_rate([point(1, 1.0, None)], fraction=0.0) is None  # no SLO: nothing to judge
