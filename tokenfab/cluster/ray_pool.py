"""Replicas as Ray actors: Ray places one engine core per bundle of a placement group (spread over the cluster's
nodes where it can) and supervises it; tokens and KV events still travel over ZeroMQ on TCP between each core and
this front end, exactly as with `tokenfab core --connect`. Needs the `ray` extra and a Ray cluster (`ray start
--head` on this machine, `ray start --address HEAD:6379` on the others; without an address a local one starts).
The ranks of an expert-parallel group (`--data-parallel-size N --expert-parallel`) meet at a rendezvous on the node
of bundle 0, wherever the others are.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
from typing import Any

from tokenfab.cluster.pool import RouterOptions, replica_configs
from tokenfab.cluster.replica import Factory
from tokenfab.cluster.router import Router
from tokenfab.config import EngineConfig
from tokenfab.engine.client import CoreProcessClient


class _CoreActor:
    """Runs one engine core inside a Ray actor, connected to the front end's two sockets."""

    def node(self) -> tuple[str, int, str]:
        import ray

        return ray.util.get_node_ip_address(), os.getpid(), ray.get_runtime_context().get_node_id()

    def free_port(self) -> int:
        from tokenfab.cluster.pool import free_port

        return free_port()

    def run(self, config: EngineConfig, to_core: str, from_core: str) -> None:
        import ray

        from tokenfab.engine.core_process import run_core

        ip = ray.util.get_node_ip_address()
        # KV events bound on this node's address, so the router (on another node, maybe) can subscribe.
        config = dataclasses.replace(
            config, kv_events_endpoint=f"tcp://{ip}:*", kv_events_replay_endpoint=f"tcp://{ip}:*"
        )
        run_core(config, to_core, from_core, watch_parent=False)


class RayReplicaClient(CoreProcessClient):
    """A core in a Ray actor: started by `start`, gone when the actor is."""

    def __init__(self, config: EngineConfig, host: str, actor_options: dict[str, Any]) -> None:
        super().__init__(config, f"tcp://{host}:*", spawn=False)
        self._actor_options = actor_options
        self._actor: Any = None
        self._run: Any = None
        self.node: str | None = None
        self.node_id: str | None = None
        """The Ray node it runs on."""
        self._pid: int | None = None

    async def start(self, timeout: float = 600.0) -> Any:
        import ray

        actor_class = ray.remote(_CoreActor)
        self._actor = actor_class.options(**self._actor_options).remote()
        self.node, self._pid, self.node_id = await asyncio.to_thread(ray.get, self._actor.node.remote())
        self._run = self._actor.run.remote(self.config, self.addresses.to_core, self.addresses.from_core)
        return await super().start(timeout)

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def alive(self) -> bool:
        return super().alive and self._gone() is None

    def _gone(self) -> str | None:
        if self._run is None:
            return None
        import ray

        done, _ = ray.wait([self._run], timeout=0)
        return "its Ray actor exited" if done else None

    async def shutdown(self, timeout: float = 10.0) -> None:
        await super().shutdown(timeout)
        if self._actor is not None:
            import ray

            ray.kill(self._actor)


def ray_router(config: EngineConfig, n: int, options: RouterOptions, address: str | None = None) -> Router:
    """N replicas on a Ray cluster (`address` as `ray.init` takes it; None starts a local one). A replica that dies
    is started again as a new actor in the same bundle."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False)
    configs = replica_configs(config, n, options.prices)
    threads = configs[0].threads
    group = placement_group([{"CPU": threads}] * n, strategy="SPREAD")
    ray.get(group.ready(), timeout=300)
    host = ray.util.get_node_ip_address()
    if config.expert_ranks:
        # Rank 0 opens the expert-parallel rendezvous where its bundle is: that node, whichever actor runs there.
        probe: Any = (
            ray.remote(_CoreActor)
            .options(
                num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0)
            )
            .remote()
        )
        (ip, _, _), port = ray.get([probe.node.remote(), probe.free_port.remote()], timeout=300)
        ray.kill(probe)
        configs = [dataclasses.replace(c, expert_parallel_master=f"{ip}:{port}") for c in configs]

    def factory(i: int, c: EngineConfig) -> Factory:
        c = dataclasses.replace(c, kv_events_endpoint=None, kv_events_replay_endpoint=None)
        if c.kv_transport == "tcp" and c.kv_transfer_host == "127.0.0.1":
            c = dataclasses.replace(c, kv_transfer_host="0.0.0.0")  # decode replicas may run on other nodes
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=i)
        return lambda: RayReplicaClient(c, host, {"num_cpus": threads, "scheduling_strategy": strategy})

    return options.router([factory(i, c) for i, c in enumerate(configs)])
