"""Local replicas: N engine-core processes on this machine, each with its share of the threads and the KV budget,
publishing KV events on an endpoint of its own."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import uuid

from tokenfab.cluster.policies import make_policy
from tokenfab.cluster.router import Router
from tokenfab.config import EngineConfig
from tokenfab.engine.client import CoreProcessClient


def replica_configs(config: EngineConfig, n: int) -> list[EngineConfig]:
    """Each replica's config: threads and KV memory split evenly (at least one thread each), KV events on."""
    if config.kv_events_endpoint is not None:
        raise ValueError(
            "with replicas, each one's KV events endpoint is chosen by the router; drop kv_events_endpoint"
        )
    threads = max(1, config.threads // n)
    base = os.path.join(tempfile.gettempdir(), f"tokenfab-kv-{uuid.uuid4().hex[:12]}")
    return [
        dataclasses.replace(
            config,
            num_threads=threads,
            kv_cache_memory_gb=config.kv_cache_memory_gb / n,
            kv_events_endpoint=f"ipc://{base}-{i}",
            kv_events_replay_endpoint=f"ipc://{base}-{i}-replay",
        )
        for i in range(n)
    ]


def local_router(
    config: EngineConfig, n: int, policy: str = "kv", transport: str = "ipc", slo_ttft: float | None = None
) -> Router:
    clients = [CoreProcessClient(c, transport) for c in replica_configs(config, n)]
    return Router(clients, make_policy(policy, slo_ttft=slo_ttft))  # type: ignore[arg-type]
