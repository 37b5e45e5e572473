"""Local replicas: N engine-core processes on this machine, each with its share of the threads and the KV budget,
publishing KV events on an endpoint of its own."""

from __future__ import annotations

import dataclasses
import os
import socket
import tempfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from tokenfab.cluster.autoscaler import AutoscaleOptions
from tokenfab.cluster.disagg import DEFAULT_SLO_TPOT, DEFAULT_SLO_TTFT, Disaggregation, RoleSwitch
from tokenfab.cluster.policies import make_policy, parse_replica_prices
from tokenfab.cluster.replica import Factory
from tokenfab.cluster.router import Router
from tokenfab.config import EngineConfig, PricingConfig
from tokenfab.engine.client import CoreProcessClient
from tokenfab.platform.prices import load_prices


def replica_configs(config: EngineConfig, n: int, prices: Sequence[str] = ()) -> list[EngineConfig]:
    """Each replica's config: threads and KV memory split evenly (at least one thread each), KV events on, and the
    pricing `prices` gives it (see `replica_pricing`)."""
    if config.kv_events_endpoint is not None:
        raise ValueError(
            "with replicas, each one's KV events endpoint is chosen by the router; drop kv_events_endpoint"
        )
    threads = max(1, config.threads // n)
    base = os.path.join(tempfile.gettempdir(), f"tokenfab-kv-{uuid.uuid4().hex[:12]}")
    pricing = replica_pricing(config.pricing, n, prices)
    ranks = config.expert_ranks
    if ranks and n != config.data_parallel_size:
        raise ValueError(f"expert parallelism over {config.data_parallel_size} ranks runs {n} replicas: give one")
    master = f"127.0.0.1:{free_port()}" if ranks else None
    return [
        dataclasses.replace(
            config,
            num_threads=threads,
            kv_cache_memory_gb=config.kv_cache_memory_gb / n,
            kv_events_endpoint=f"ipc://{base}-{i}",
            kv_events_replay_endpoint=f"ipc://{base}-{i}-replay",
            pricing=pricing[i],
            expert_parallel_rank=i,
            expert_parallel_master=master,
        )
        for i in range(n)
    ]


def free_port() -> int:
    """A TCP port free on this host now (for a rendezvous that rank 0 opens)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def replica_pricing(base: PricingConfig, n: int, prices: Sequence[str]) -> list[PricingConfig]:
    """Each replica's pricing from `ID=USD_PER_HOUR` (the replica's --usd-per-hour: per core for a cpu profile)
    or `ID=PROFILE` (a device profile of the catalogue, with its own price and watts); replicas not named keep
    `base`. A heterogeneous pool (CPU and GPU nodes, spot and on-demand) then routes by cost."""
    out = [base] * n
    for i, value in parse_replica_prices(prices, n).items():
        if isinstance(value, float):
            out[i] = dataclasses.replace(base, usd_per_hour=value)
        else:
            out[i] = dataclasses.replace(base, profile=value, usd_per_hour=None, idle_watts=None, peak_watts=None)
        # An unknown profile fails here, before any replica starts, not as a replica that cannot start.
        load_prices(out[i].profile or "cpu", "cpu", 1, base.prices_file, usd_per_hour=out[i].usd_per_hour)
    return out


@dataclass(frozen=True, slots=True)
class RouterOptions:
    """How the router spreads requests and what it does when a replica is lost (ServerSettings' fields)."""

    policy: str = "kv"
    slo_ttft: float | None = None
    slo_tpot: float | None = None
    migration: bool = True
    max_migrations: int = 3
    hang_timeout: float = 60.0
    prices: tuple[str, ...] = ()
    """Per-replica prices: `ID=USD_PER_HOUR` or `ID=PROFILE` (`replica_pricing`)."""
    autoscale: AutoscaleOptions | None = None
    """Start min_replicas of the replicas and scale between the bounds (None: run them all)."""
    roles: tuple[str, ...] = ()
    """Each replica's role (both, prefill, decode); empty: all both (tokenfab.cluster.disagg)."""
    disaggregation: str = "conditional"
    """With prefill replicas: conditional (per request, from the step costs) or always; auto: aggregated replicas
    one of which turns into a prefill replica (and back) as the measured SLO misses say (RoleSwitch)."""
    step_prior: tuple[float, float, float] | None = None
    """What each replica's step-cost fit starts from: (overhead, per_token, per_seq), from a profile."""

    def router(self, factories: list[Factory]) -> Router:
        return Router(
            [make() for make in factories],
            make_policy(self.policy, slo_ttft=self.slo_ttft, slo_tpot=self.slo_tpot),
            factories,
            migration=self.migration,
            max_migrations=self.max_migrations,
            hang_timeout=self.hang_timeout,
            autoscale=self.autoscale,
            roles=self.roles,
            disaggregation=Disaggregation(
                slo_ttft=self.slo_ttft,
                always=self.disaggregation == "always",
                roles=RoleSwitch(self.slo_ttft or DEFAULT_SLO_TTFT, self.slo_tpot or DEFAULT_SLO_TPOT)
                if self.disaggregation == "auto"
                else None,
            ),
            step_prior=self.step_prior,
        )


def local_router(config: EngineConfig, n: int, options: RouterOptions, transport: str = "ipc") -> Router:
    """N engine-core processes here; one that dies is started again (same config, fresh sockets)."""

    def factory(c: EngineConfig) -> Factory:
        return lambda: CoreProcessClient(c, transport)

    return options.router([factory(c) for c in replica_configs(config, n, options.prices)])
