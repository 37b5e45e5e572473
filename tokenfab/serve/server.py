"""`tokenfab serve`: build the state and app, run uvicorn, drain on SIGTERM/SIGINT and exit 0 (3 if the engine had
died, 1 if the server never started)."""

from __future__ import annotations

import dataclasses
import logging
import math
import signal
import time

import uvicorn

from tokenfab.cluster.pool import RouterOptions, local_router
from tokenfab.cluster.replica import StepCost
from tokenfab.config import EngineConfig
from tokenfab.engine.client import EngineClient, make_engine_client
from tokenfab.engine.expert_ranks import check_expert_parallel
from tokenfab.engine.speculative.speculator import check_speculative
from tokenfab.models.loading import load_tokenizer, resolve_model
from tokenfab.platform.logs import log_to_stderr
from tokenfab.serve.app import build_app
from tokenfab.serve.connections import connection_cap, guarded_protocol
from tokenfab.serve.engine_client import AsyncEngineClient
from tokenfab.serve.metrics import ServerMetrics
from tokenfab.serve.settings import ServerSettings
from tokenfab.serve.state import ServerState

log = logging.getLogger("tokenfab.serve")
ENGINE_DIED = 3
"""Exit code after serving with an engine that died (every replica, with replicas): a supervisor restarts on it.
0 is a clean stop, 1 a failed start."""


class _DrainingServer(uvicorn.Server):
    """uvicorn stops accepting connections on SIGTERM and waits for in-flight ones; we also refuse new requests
    on connections that stay open (503) and report not-ready at once."""

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state

    def handle_exit(self, sig: int, frame) -> None:
        if sig in (signal.SIGTERM, signal.SIGINT):
            self._state.drain()
        super().handle_exit(sig, frame)
        # uvicorn re-raises captured signals after shutting down, which would end the process with -SIGTERM;
        # a drained, clean shutdown exits 0.
        self._captured_signals = [s for s in self._captured_signals if s not in (signal.SIGTERM, signal.SIGINT)]


def build_state(engine: EngineConfig, settings: ServerSettings) -> ServerState:
    source = resolve_model(engine.model, prefer_gguf=engine.quant_plan.uses("gguf"))
    check_speculative(engine, source)
    check_expert_parallel(engine, source)
    tokenizer = load_tokenizer(source)
    # Both lambdas look the other object up when called, after both exist.
    metrics = ServerMetrics(settings.served_model_name, lambda: client.stats, lambda: client.alive)
    core: EngineClient
    options = RouterOptions(
        settings.router,
        settings.slo_ttft,
        settings.slo_tpot,
        settings.migration,
        settings.max_migrations,
        settings.replica_hang_timeout,
        settings.replica_price,
        settings.autoscale_options(),
        settings.replica_roles,
        settings.disaggregation,
        StepCost.measured(settings.step_profile) if settings.step_profile else None,
    )
    if engine.data_parallel_size > 1 and (settings.replica_slots > 1 or settings.moves_kv):
        raise ValueError(
            "--data-parallel-size runs its ranks as this server's replicas: drop --replicas and the prefill/decode "
            "options"
        )
    slots = engine.data_parallel_size if engine.data_parallel_size > 1 else settings.replica_slots
    if settings.moves_kv and engine.kv_transport is None:
        engine = dataclasses.replace(engine, kv_transport="tcp" if settings.ray else "shm")
    if settings.ray:
        from tokenfab.cluster.ray_pool import ray_router

        core = ray_router(engine, slots, options, settings.ray_address)
        metrics.watch_router(core)
    elif slots > 1:
        core = local_router(engine, slots, options, settings.engine_transport)
        metrics.watch_router(core)
    else:
        core = make_engine_client(engine, settings.engine_transport, spawn=not settings.external_core)
    client = AsyncEngineClient(
        core,
        tokenizer,
        on_step=lambda result, _: metrics.observe_stats(result.stats),
        on_abort=lambda out: metrics.observe_finished(out, time.monotonic()),
    )
    return ServerState(settings, tokenizer, client, metrics)


def serve(engine: EngineConfig, settings: ServerSettings, log_level: str = "info") -> int:
    log_to_stderr(log_level)
    state = build_state(engine, settings)
    protocol = guarded_protocol(
        connection_cap(settings.max_connections), settings.header_timeout, state.metrics.observe_connection_closed
    )
    config = uvicorn.Config(
        build_app(state),
        host=settings.host,
        port=settings.port,
        log_level=log_level,
        timeout_graceful_shutdown=math.ceil(settings.graceful_shutdown_timeout),
        lifespan="on",
        access_log=log_level == "debug",
        http=protocol,
    )
    server = _DrainingServer(config, state)
    server.run()
    if not server.started:
        return 1
    if state.client.dead not in (None, "shut down"):
        log.error("exiting with code %d: the engine had died (%s)", ENGINE_DIED, state.client.dead)
        return ENGINE_DIED
    return 0
