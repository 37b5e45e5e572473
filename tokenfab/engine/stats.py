"""The engine core's stats: nested msgspec structs, each field declared once with the metric it is exported as.

`EngineStats` is a snapshot (scheduler, KV cache, prefix cache, speculation, cost) sent with every step's outputs;
each part is produced by the manager that owns the numbers. A field annotated `Annotated[int, counter(...)]` or
`gauge(...)` is rendered under `tokenfab:<name>` by `tokenfab.serve.metrics` by walking `exported(stats)`, with no
list of fields anywhere else.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from typing import Annotated

import msgspec


@dataclass(frozen=True, slots=True)
class Metric:
    kind: str
    """gauge or counter."""
    name: str
    doc: str


def gauge(name: str, doc: str) -> Metric:
    return Metric("gauge", name, doc)


def counter(name: str, doc: str) -> Metric:
    return Metric("counter", name, doc)


class SchedulerStats(msgspec.Struct, gc=False):
    num_running: Annotated[int, gauge("num_requests_running", "Sequences running in the engine")] = 0
    num_waiting: Annotated[int, gauge("num_requests_waiting", "Sequences waiting in the engine")] = 0
    num_preemptions: Annotated[int, counter("num_preemptions", "Sequences preempted (recomputed later)")] = 0
    steps: Annotated[int, counter("engine_steps", "Engine steps")] = 0
    prompt_tokens_computed: Annotated[
        int, counter("prompt_tokens_computed", "Prompt tokens run through the model (cache hits excluded)")
    ] = 0
    tokens_computed: int = 0
    """Every token run through the model (prompt chunks, decodes and drafts under verification)."""
    generated_tokens: Annotated[int, counter("engine_generated_tokens", "Tokens sampled by the engine")] = 0


class KVStats(msgspec.Struct, gc=False):
    usage: Annotated[float, gauge("kv_cache_usage_perc", "Fraction of KV blocks in use (1 = full)")] = 0.0
    free_blocks: Annotated[int, gauge("kv_cache_free_blocks", "KV blocks free (cached-free included), all groups")] = 0
    total_blocks: Annotated[int, gauge("kv_cache_total_blocks", "KV blocks, all groups")] = 0
    pinned_blocks: Annotated[
        int, gauge("kv_cache_pinned_blocks", "Unused KV blocks kept for a session's next turn (until its TTL)")
    ] = 0
    pin_expiries: Annotated[
        int, counter("kv_cache_pin_expiries", "Kept KV blocks whose session TTL ran out (then evictable)")
    ] = 0
    pins_reclaimed: Annotated[
        int, counter("kv_cache_pins_reclaimed", "Kept KV blocks handed out before their TTL (nothing else was free)")
    ] = 0


class PrefixCacheStats(msgspec.Struct, gc=False):
    queries: Annotated[int, counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")] = 0
    hits: Annotated[int, counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")] = 0

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


class SpecStats(msgspec.Struct, gc=False):
    """Speculative decoding since start (all zero with method none)."""

    method: str = "none"
    proposed_tokens: Annotated[int, counter("spec_proposed_tokens", "Draft tokens verified by the target")] = 0
    accepted_tokens: Annotated[int, counter("spec_accepted_tokens", "Draft tokens accepted")] = 0
    verified_seqs: Annotated[int, counter("spec_verifications", "Request-steps that verified drafts")] = 0
    """Mean acceptance length = 1 + accepted / verified."""
    draft_seconds: Annotated[
        float, counter("spec_draft_seconds", "Time spent proposing drafts (part of engine busy time)")
    ] = 0.0
    steps_on: Annotated[int, counter("spec_steps_on", "Engine steps that verified drafts")] = 0
    steps_off: Annotated[
        int, counter("spec_steps_off", "Engine steps that sampled without drafts (speculation off or no guess)")
    ] = 0
    probes: int = 0
    """Steps the adaptive policy spent measuring a k it would not otherwise pick."""

    @property
    def mean_acceptance_length(self) -> float:
        return 1 + self.accepted_tokens / self.verified_seqs if self.verified_seqs else 0.0


class CostStats(msgspec.Struct, gc=False):
    busy_seconds: Annotated[float, counter("engine_busy_seconds", "Wall time of engine steps")] = 0.0
    joules: Annotated[float, counter("energy_joules", "Energy of engine steps")] = 0.0
    usd: Annotated[float, counter("cost_usd", "Price of engine steps (device time + energy)")] = 0.0
    energy_source: str = "modelled"
    meter: str = ""


class TierStats(msgspec.Struct, gc=False):
    """KV tiers below the engine's pool (all zero without them)."""

    media: str = ""
    """The tiers' media, fastest first (`CPU_TIER,DISK`); empty without tiers."""
    host_blocks: Annotated[int, gauge("kv_tier_host_blocks", "KV blocks held in the host-memory tier")] = 0
    host_bytes: Annotated[int, gauge("kv_tier_host_bytes", "Bytes of KV held in the host-memory tier")] = 0
    disk_blocks: Annotated[int, gauge("kv_tier_disk_blocks", "KV blocks held in the disk tier")] = 0
    disk_bytes: Annotated[int, gauge("kv_tier_disk_bytes", "Bytes of KV held in the disk tier")] = 0
    host_stored: Annotated[int, counter("kv_tier_host_stored_blocks", "Blocks written to the host tier")] = 0
    disk_stored: Annotated[int, counter("kv_tier_disk_stored_blocks", "Blocks written to the disk tier")] = 0
    host_hit_tokens: Annotated[
        int, counter("kv_tier_host_hit_tokens", "Prompt tokens loaded from the host tier instead of recomputed")
    ] = 0
    disk_hit_tokens: Annotated[
        int, counter("kv_tier_disk_hit_tokens", "Prompt tokens loaded from the disk tier instead of recomputed")
    ] = 0
    prefetched_blocks: Annotated[
        int, counter("kv_tier_prefetched_blocks", "Blocks of sessions within their TTL brought back to the pool early")
    ] = 0
    loads_declined: Annotated[
        int, counter("kv_tier_loads_declined", "Tier hits recomputed because loading was predicted slower")
    ] = 0
    load_seconds: Annotated[float, counter("kv_tier_load_seconds", "Time spent loading blocks from the tiers")] = 0.0
    store_seconds: Annotated[
        float, counter("kv_tier_store_seconds", "Time spent copying evicted blocks into the tiers (on the step)")
    ] = 0.0
    corrupt_blocks: Annotated[
        int, counter("kv_tier_corrupt_blocks", "Disk-tier blocks that failed their checks (dropped, recomputed)")
    ] = 0
    disk_write_errors: Annotated[
        int, counter("kv_tier_disk_write_errors", "Disk-tier writes that failed (the tier then takes no more)")
    ] = 0


class TransferStats(msgspec.Struct, gc=False):
    """KV moved between replicas for prefill/decode splits (all zero without a KV transport)."""

    transport: str = ""
    """shm or tcp; empty when the engine has no KV transport."""
    exports_held: Annotated[
        int, gauge("kv_transfer_exports_held", "Finished prefills whose KV blocks wait for a decode replica")
    ] = 0
    exported: Annotated[int, counter("kv_transfer_exports", "Prefill legs whose KV was held for a decode replica")] = 0
    exports_released: Annotated[
        int, counter("kv_transfer_exports_released", "Held prefill KV released by the decode replica that pulled it")
    ] = 0
    exports_expired: Annotated[
        int, counter("kv_transfer_exports_expired", "Held prefill KV freed because no decode replica released it")
    ] = 0
    pulls: Annotated[
        int, counter("kv_transfer_pulls", "Sequences whose prompt KV was pulled from a prefill replica")
    ] = 0
    pulled_blocks: Annotated[int, counter("kv_transfer_pulled_blocks", "KV blocks pulled from prefill replicas")] = 0
    pulled_bytes: Annotated[int, counter("kv_transfer_pulled_bytes", "Bytes of KV pulled from prefill replicas")] = 0
    pull_seconds: Annotated[float, counter("kv_transfer_pull_seconds", "Time spent pulling KV (on the step)")] = 0.0
    sent_bytes: Annotated[int, counter("kv_transfer_sent_bytes", "Bytes of KV sent to decode replicas over tcp")] = 0
    failures: Annotated[
        int, counter("kv_transfer_failures", "Pulls that failed or timed out (the prompt was computed here)")
    ] = 0


class MoEStats(msgspec.Struct, gc=False):
    """Where a mixture-of-experts model's tokens went (empty for a dense model)."""

    expert_tokens: list[list[int]] = msgspec.field(default_factory=list)
    """Since start, per MoE layer and expert: tokens routed there (a token counts once for each of its k experts)."""
    rank_tokens: list[int] = msgspec.field(default_factory=list)
    """With expert parallelism: token-expert pairs computed by each rank's experts, since start."""
    rebalances: Annotated[int, counter("moe_rebalances", "Expert placements changed by the load balancer")] = 0
    exchange_seconds: Annotated[
        float, counter("moe_all_to_all_seconds", "Time expert-parallel ranks spent in the experts' all-to-alls")
    ] = 0.0
    step_seconds: Annotated[
        float,
        counter("moe_rank_step_seconds", "Time expert-parallel ranks spent in the group's steps (idle parts too)"),
    ] = 0.0

    @property
    def exchange_share(self) -> float:
        """The ranks' time in all-to-alls over their time in steps (0 without expert parallelism)."""
        return self.exchange_seconds / self.step_seconds if self.step_seconds else 0.0

    @property
    def imbalance(self) -> float:
        """Max over mean tokens per expert, averaged over the MoE layers (1 = even; 0 before any token)."""
        ratios = [max(layer) * len(layer) / sum(layer) for layer in self.expert_tokens if sum(layer)]
        return sum(ratios) / len(ratios) if ratios else 0.0

    @property
    def rank_imbalance(self) -> float:
        """Max over mean of rank_tokens (1 = even; 0 without expert parallelism or before any token)."""
        total = sum(self.rank_tokens)
        return max(self.rank_tokens) * len(self.rank_tokens) / total if total else 0.0


class EngineStats(msgspec.Struct, gc=False):
    """A snapshot of the core's gauges and counters, sent with step outputs."""

    time: float
    scheduler: SchedulerStats
    kv: KVStats
    prefix_cache: PrefixCacheStats
    spec: SpecStats
    cost: CostStats
    tiers: TierStats = msgspec.field(default_factory=TierStats)
    transfer: TransferStats = msgspec.field(default_factory=TransferStats)
    moe: MoEStats = msgspec.field(default_factory=MoEStats)


@cache
def _metrics(cls: type) -> tuple[tuple[str, Metric], ...]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return tuple(
        (name, meta)
        for name, hint in hints.items()
        for meta in getattr(hint, "__metadata__", ())
        if isinstance(meta, Metric)
    )


def exported(part: msgspec.Struct) -> Iterator[tuple[Metric, float]]:
    """Each metric a stats part declares, with its current value."""
    for name, metric in _metrics(type(part)):
        yield metric, getattr(part, name)
