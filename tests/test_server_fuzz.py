"""Fuzz the served OpenAPI spec with schemathesis (valid and invalid bodies): no 5xx, and still healthy after.

Bounded: a fixed number of examples per operation and mode, a short context so no request runs long.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from live_server import LiveServer

EXAMPLES = 30


@pytest.fixture(scope="module")
def live(tiny_model):
    server = LiveServer(tiny_model("llama"), "--max-model-len", "128", "--request-timeout", "30", "--enable-docs")
    yield server
    assert server.stop() == 0


@pytest.mark.parametrize("mode", list(schemathesis.GenerationMode), ids=lambda m: m.value)
def test_no_server_errors(live, mode):
    schema = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/tokenize"}
    calls, served = [], []

    for op in operations:
        if mode is schemathesis.GenerationMode.NEGATIVE and op.method.upper() != "POST":
            continue  # nothing to make invalid in a GET without parameters
        @given(case=op.as_strategy(generation_mode=mode))
        @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
                  database=None)
        def fuzz(case):
            response = case.call_and_validate(base_url=live.url, checks=[not_a_server_error], timeout=60)
            calls.append(response.status_code)
            if mode is schemathesis.GenerationMode.NEGATIVE and not 400 <= response.status_code < 500:
                served.append((op.path, response.status_code, case.body, response.text[:300]))

        fuzz()
    assert len(calls) >= EXAMPLES and all(code < 500 for code in calls)
    if mode is schemathesis.GenerationMode.NEGATIVE:
        assert not served, served  # invalid bodies are refused, never served


def test_still_healthy_after_fuzzing(live):
    assert httpx.get(f"{live.url}/health").status_code == 200
    r = httpx.post(f"{live.url}/v1/completions", json={"prompt": "w5 w6", "max_tokens": 3}, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
