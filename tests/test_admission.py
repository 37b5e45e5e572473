"""Admission: prompts x n count as requests, Retry-After predicts when the refused request would fit (measured
over busy time, so an idle spell does not shorten it), and sibling seeds never repeat another request's seed."""

from __future__ import annotations

import pytest

from tokenfab.engine.output_processor import sibling_seed
from tokenfab.serve.admission import Admission
from tokenfab.serve.errors import APIError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def refusal(admission: Admission, tokens: int, requests: int = 1) -> APIError:
    with pytest.raises(APIError) as e:
        admission.admit(tokens, requests)
    return e.value


def test_a_prompt_list_counts_as_that_many_requests():
    a = Admission(max_requests=12, max_tokens=10_000)
    big = a.admit(tokens=100, requests=10)
    assert (a.requests, a.tokens) == (10, 100)
    assert refusal(a, 30, 3).status == 429
    small = a.admit(20, 2)
    a.release(big)
    a.release(big)  # twice is harmless
    assert (a.requests, a.tokens) == (2, 20)
    a.release(small)
    too_many = refusal(a, 10, 13)
    assert too_many.status == 400 and too_many.code == "too_many_sequences" and too_many.param == "prompt"


def test_retry_after_is_the_drain_time_of_the_excess_at_the_busy_rate():
    clock = Clock()
    a = Admission(max_requests=100, max_tokens=1_000, clock=clock)
    tickets = [a.admit(100) for _ in range(10)]  # full: 1,000 tokens
    for t in tickets[:5]:  # drains 100 tokens a second
        clock.now += 1.0
        a.release(t)
    tickets[:5] = [a.admit(100) for _ in range(5)]
    e = refusal(a, 500)  # 500 tokens over: 5 s at 100 tokens/s
    assert e.status == 429 and e.headers == {"Retry-After": "5"}
    assert refusal(a, 2000).headers == {"Retry-After": "20"}
    for t in tickets:
        clock.now += 1.0
        a.release(t)
    clock.now += 3600.0  # an hour idle does not make the measured rate any slower or faster
    tickets = [a.admit(100) for _ in range(10)]
    assert refusal(a, 500).headers["Retry-After"] == "5"


def test_retry_after_counts_requests_when_requests_are_the_limit():
    clock = Clock()
    a = Admission(max_requests=4, max_tokens=1_000_000, clock=clock)
    held = [a.admit(1) for _ in range(4)]
    for t in held[:3]:  # one request finishes every 2 s
        clock.now += 2.0
        a.release(t)
    held = [held[3]] + [a.admit(1) for _ in range(3)]
    assert refusal(a, 1, 3).headers == {"Retry-After": "6"}  # three requests over: 6 s
    assert Admission(1, 10).retry_after(5, 5) == 1  # nothing measured yet


def test_draining_refuses_with_503():
    a = Admission(4, 100)
    a.accepting = False
    assert refusal(a, 1).status == 503


def test_sibling_seeds_are_mixed_not_consecutive():
    assert sibling_seed(7, 0) == 7  # choice 0 is what n = 1 gives
    assert sibling_seed(7, 1) != 8 and sibling_seed(7, 2) != 9
    seeds = {sibling_seed(s, i) for s in range(200) for i in range(1, 16)}
    assert len(seeds) == 200 * 15  # no two siblings share a seed
    assert not seeds & set(range(-1000, 10_000))  # nor any small seed a client would send
    assert all(0 <= s < 2**63 for s in seeds)
    assert sibling_seed(-5, 3) == sibling_seed(-5, 3)
