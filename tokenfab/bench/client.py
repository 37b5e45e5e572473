"""One streamed request against an OpenAI-compatible /v1/completions, timed chunk by chunk.

Every outcome becomes a RequestRecord: HTTP errors, timeouts, dropped connections and malformed streams are
recorded with their kind instead of raised, so a run always reports what happened to each request.
"""

from __future__ import annotations

import json
import time

import httpx

from tokenfab.bench.records import RequestRecord


class Unreachable(RuntimeError):
    """The server cannot be reached or does not speak the OpenAI API."""


async def probe(client: httpx.AsyncClient) -> dict:
    """GET /v1/models: the first model card (id, and max_model_len where the server says it)."""
    try:
        r = await client.get("/v1/models", timeout=10)
    except httpx.HTTPError as e:
        raise Unreachable(f"cannot reach {client.base_url}: {type(e).__name__}: {e}") from None
    if r.status_code != 200:
        raise Unreachable(f"{client.base_url}/v1/models answered {r.status_code}: {r.text[:200]}")
    try:
        return r.json()["data"][0]
    except (ValueError, KeyError, IndexError):
        raise Unreachable(f"{client.base_url}/v1/models is not an OpenAI model list: {r.text[:200]}") from None


async def stream_completion(
    client: httpx.AsyncClient,
    model: str,
    prompt: str,
    prompt_tokens: int,
    max_tokens: int,
    ignore_eos: bool = True,
    timeout: float = 600.0,
    session: str | None = None,
    turn: int = 0,
    sampling: dict | None = None,
) -> tuple[RequestRecord, str]:
    """Send one request (greedy unless `sampling` sets temperature, top_p, seed, ...); returns its record and the
    generated text."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": ignore_eos,
        **(sampling or {}),
    }
    record = RequestRecord(start=time.monotonic(), end=0.0, prompt_tokens=prompt_tokens, session=session, turn=turn)
    pieces: list[str] = []
    try:
        async with client.stream("POST", "/v1/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                await r.aread()
                record.error = _http_kind(r.status_code)
            else:
                async for line in r.aiter_lines():
                    if _take(line, record, pieces):
                        break
    except httpx.TimeoutException:
        record.error = "timeout"
    except httpx.TransportError:
        record.error = "connection"
    record.end = time.monotonic()
    if record.ok and not record.token_times:
        record.error = "protocol"  # a 200 stream that never produced a token
    _spread_tokens(record)
    return record, "".join(pieces)


def _take(line: str, record: RequestRecord, pieces: list[str]) -> bool:
    """Handle one SSE line; True at the end of the stream."""
    if not line.startswith("data:"):
        return False
    data = line[5:].strip()
    if data == "[DONE]":
        return True
    try:
        chunk = json.loads(data)
    except ValueError:
        record.error = "protocol"
        return True
    if "error" in chunk:
        record.error = "stream_error"
        return True
    for choice in chunk.get("choices") or []:
        if choice.get("text"):
            pieces.append(choice["text"])
            record.token_times.append(time.monotonic())
    usage = chunk.get("usage")
    if usage:
        _usage(usage, record)
    return False


def _usage(usage: dict, record: RequestRecord) -> None:
    record.output_tokens = int(usage.get("completion_tokens") or 0)
    record.prompt_tokens = int(usage.get("prompt_tokens") or record.prompt_tokens)
    details = usage.get("prompt_tokens_details") or {}
    if details.get("cached_tokens") is not None:
        record.cached_tokens = int(details["cached_tokens"])
    cost = usage.get("cost")
    if isinstance(cost, dict):
        record.cost_usd = cost.get("usd")
        record.joules = cost.get("joules")
        record.energy_source = cost.get("energy_source")


def _spread_tokens(record: RequestRecord) -> None:
    """Tokens per chunk: servers send about one token per chunk; when usage says otherwise, spread evenly."""
    chunks = len(record.token_times)
    if not chunks:
        return
    total = record.output_tokens or chunks
    record.output_tokens = total
    base, extra = divmod(total, chunks)
    record.chunk_tokens = [base + (1 if i < extra else 0) for i in range(chunks)]


def _http_kind(status: int) -> str:
    if status == 429:
        return "http_429"
    return "http_5xx" if status >= 500 else "http_4xx"
