"""The FastAPI application: OpenAI routes, health and readiness, Prometheus metrics, tokenize/detokenize."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, Protocol, TypeVar, cast

from fastapi import FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from tokenfab.serve import chat, completions, errors
from tokenfab.serve.errors import APIError, bad_request
from tokenfab.serve.generation import Job
from tokenfab.serve.guard import Guard, GuardSettings, default_hosts
from tokenfab.serve.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
    TokenizerInfo,
)
from tokenfab.serve.requests import check_model, render_chat
from tokenfab.serve.state import ServerState
from tokenfab.version import __version__

ERRORS: dict[int | str, dict[str, Any]] = {code: {"model": ErrorResponse} for code in (400, 404, 429, 503, 504)}
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
REPLICA_HEADER = "X-Tokenfab-Replica"
"""Which replica serves the request (one id per prompt, comma-separated)."""


def build_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(_: FastAPI):
        await state.start()
        try:
            yield
        finally:
            await state.stop()

    settings = state.settings
    docs = settings.enable_docs
    app = FastAPI(
        title="tokenfab",
        version=__version__,
        lifespan=lifespan,
        description="OpenAI-compatible LLM server; every response's usage carries its cost and energy.",
        openapi_url="/openapi.json" if docs else None,
        docs_url="/docs" if docs else None,
        redoc_url=None,
    )
    errors.install(app)
    _routes(app, state)
    guard = GuardSettings(
        api_key=settings.api_key,
        allowed_hosts=default_hosts(settings.host, settings.allowed_hosts),
        allowed_origins=frozenset(settings.allowed_origins),
        max_body_bytes=int(settings.max_body_mb * 2**20),
        body_timeout=settings.body_timeout,
        large_body_bytes_per_s=settings.large_body_mb_per_s * 2**20,
    )
    app.add_middleware(Guard, settings=guard, on_refusal=state.metrics.observe_rejected)
    if settings.allowed_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.allowed_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app


async def _replica_action(state: ServerState, action: str, index: int) -> dict:
    router = state.router
    if router is None:
        raise APIError(
            400,
            "this server runs one engine; start it with --replicas N to manage replicas",
            "invalid_request_error",
            code="no_replicas",
        )
    try:
        return await (router.drain(index) if action == "drain" else router.resume(index))
    except KeyError as e:
        raise APIError(404, str(e.args[0]), "not_found_error", code="replica_not_found") from None
    except ValueError as e:
        raise APIError(409, str(e), "invalid_request_error", code="replica_state") from None


def _routes(app: FastAPI, state: ServerState) -> None:
    @app.get(
        "/health", summary="Liveness: 200 while an engine core takes work and steps (with replicas: each one's state)"
    )
    async def health() -> JSONResponse:
        hung = state.client.stalled_for > state.settings.replica_hang_timeout
        ok = state.client.alive and not hung
        body: dict = {"status": "ok" if ok else "engine_hung" if hung else "engine_dead"}
        if state.router is not None:
            body["replicas"] = state.router.states()
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/ready", summary="Readiness: 200 while requests are admitted (not while draining)")
    async def ready() -> JSONResponse:
        ok = state.ready
        return JSONResponse({"ready": ok}, status_code=200 if ok else 503)

    @app.get("/metrics", summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/replicas")
    async def replicas() -> dict:
        router = state.router
        out: dict = {"router": state.settings.router if router is not None else None, "replicas": state.replicas()}
        if router is not None and router.scaler is not None:
            out["autoscaler"] = router.autoscale_state()
        if router is not None and router.disagg is not None:
            out["disaggregation"] = router.disagg_state()
        return out

    @app.post("/replicas/{index}/drain", summary="Move a replica's requests to the others and stop it")
    async def drain(index: int) -> dict:
        return await _replica_action(state, "drain", index)

    @app.post("/replicas/{index}/resume", summary="Start a drained replica again")
    async def resume(index: int) -> dict:
        return await _replica_action(state, "resume", index)

    @app.get("/v1/models", response_model=ModelList)
    async def models() -> dict:
        return {
            "object": "list",
            "data": [
                {
                    "id": state.settings.served_model_name,
                    "object": "model",
                    "created": int(state.started),
                    "owned_by": "tokenfab",
                    "max_model_len": state.info.max_model_len,
                    "quantization": state.info.quantization,
                    "weight_bytes": state.info.weight_bytes,
                    "kernel_isa": state.info.kernel_isa,
                    "kernel_isa_reason": state.info.kernel_isa_reason,
                    "cpu_flags": state.info.cpu_flags,
                    "batch_invariant": state.info.batch_invariant,
                    "block_size": state.info.block_size,
                    "kv_events_endpoint": state.info.kv_events_endpoint,
                    "kv_events_replay_endpoint": state.info.kv_events_replay_endpoint,
                }
            ],
        }

    @app.post("/v1/completions", response_model=CompletionResponse, responses=ERRORS)
    async def create_completion(body: CompletionRequest, request: Request, response: Response):
        return await _generate(state, completions, body, request, response)

    @app.post("/v1/chat/completions", response_model=ChatCompletionResponse, responses=ERRORS)
    async def create_chat_completion(body: ChatCompletionRequest, request: Request, response: Response):
        return await _generate(state, chat, body, request, response)

    _tokenizer_routes(app, state)


def _tokenizer_routes(app: FastAPI, state: ServerState) -> None:

    @app.get("/tokenizer_info", response_model=TokenizerInfo)
    async def tokenizer_info() -> dict:
        tok, special = state.tokenizer, state.tokenizer.special

        def name(token_id: int | None) -> str | None:
            return tok.inner.id_to_token(token_id) if token_id is not None else None

        eos = special.eos_token_ids[0] if special.eos_token_ids else None
        return {
            "bos_token": name(special.bos_token_id),
            "eos_token": name(eos),
            "pad_token": name(special.pad_token_id),
            "add_bos_token": special.add_bos_token,
            "chat_template": special.chat_template,
            "model_max_length": state.info.max_model_len,
            "vocab_size": tok.vocab_size,
        }

    @app.post("/tokenize", response_model=TokenizeResponse, responses=ERRORS)
    async def tokenize(body: TokenizeRequest) -> dict:
        check_model(body.model, state.settings.served_model_name)
        if (body.prompt is None) == (body.messages is None):
            raise bad_request("send exactly one of prompt and messages", "prompt")
        ids = await state.offload(_token_ids, body, state)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.info.max_model_len}

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=ERRORS)
    async def detokenize(body: DetokenizeRequest) -> dict:
        check_model(body.model, state.settings.served_model_name)
        bad = [t for t in body.tokens if t >= state.info.vocab_size]
        if bad:
            raise bad_request(f"token ids out of range [0, {state.info.vocab_size}): {bad[:5]}", "tokens")
        return {"prompt": state.tokenizer.decode(body.tokens, skip_special_tokens=False)}


def _token_ids(body: TokenizeRequest, state: ServerState) -> list[int]:
    if body.prompt is not None:
        return state.tokenizer.encode(body.prompt, body.add_special_tokens)
    assert body.messages is not None
    prompt = render_chat(
        body.messages, body.add_generation_prompt, state.tokenizer, state.tool_template, tools=body.tools
    )
    return prompt.token_ids


Body = TypeVar("Body", CompletionRequest, ChatCompletionRequest)
Body_contra = TypeVar("Body_contra", CompletionRequest, ChatCompletionRequest, contravariant=True)


class RouteKind(Protocol[Body_contra]):
    """What a generating route's module provides (tokenfab.serve.completions, tokenfab.serve.chat)."""

    def prepare(self, body: Body_contra, state: ServerState) -> Job: ...

    def complete(self, body: Body_contra, job: Job, state: ServerState) -> Awaitable[dict]: ...

    def stream(self, body: Body_contra, job: Job, state: ServerState) -> AsyncIterator[str | None]: ...


async def _generate(
    state: ServerState, kind: RouteKind[Body], body: Body, request: Request, response: Response
) -> Response | dict:
    """Completions and chat alike: validate, then stream or answer whole (`kind` is the module that formats)."""
    check_model(body.model, state.settings.served_model_name)
    if not state.client.alive:
        raise APIError(503, "the engine is not available", "service_unavailable", code="engine_unavailable")
    # Validation, templating and tokenization (admission itself happens when generation starts).
    job = await state.offload(kind.prepare, body, state)
    headers = {REPLICA_HEADER: state.place(job)}
    if body.stream:
        return await _streaming(kind.stream(body, job, state), headers)
    response.headers.update(headers)
    return await _unless_disconnected(request, kind.complete(body, job, state))


async def _streaming(events: AsyncIterator[str | None], headers: dict[str, str]) -> StreamingResponse:
    """Start the stream before answering: its first item (None) comes once the request is admitted, so a
    refusal is still a plain 4xx and not an error inside a 200 stream."""
    await events.__anext__()
    rest = cast(AsyncIterator[str], events)  # only the first item is None
    return StreamingResponse(rest, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})


async def _unless_disconnected(request: Request, work: Awaitable[dict]) -> Response | dict:
    """Run a non-streaming request, aborting it (and freeing its KV blocks) if the client goes away."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if not task.done():
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        return Response(status_code=499)
    return task.result()


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
