"""Local replicas: N engine-core processes on this machine, each with its share of the threads and the KV budget,
publishing KV events on an endpoint of its own."""

from __future__ import annotations

import dataclasses
import os
import tempfile
import uuid
from dataclasses import dataclass

from tokenfab.cluster.policies import make_policy
from tokenfab.cluster.replica import Factory
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


@dataclass(frozen=True, slots=True)
class RouterOptions:
    """How the router spreads requests and what it does when a replica is lost (ServerSettings' fields)."""

    policy: str = "kv"
    slo_ttft: float | None = None
    slo_tpot: float | None = None
    migration: bool = True
    max_migrations: int = 3
    hang_timeout: float = 60.0

    def router(self, factories: list[Factory]) -> Router:
        return Router(
            [make() for make in factories],
            make_policy(self.policy, slo_ttft=self.slo_ttft, slo_tpot=self.slo_tpot),
            factories,
            migration=self.migration,
            max_migrations=self.max_migrations,
            hang_timeout=self.hang_timeout,
        )


def local_router(config: EngineConfig, n: int, options: RouterOptions, transport: str = "ipc") -> Router:
    """N engine-core processes here; one that dies is started again (same config, fresh sockets)."""

    def factory(c: EngineConfig) -> Factory:
        return lambda: CoreProcessClient(c, transport)

    return options.router([factory(c) for c in replica_configs(config, n)])
