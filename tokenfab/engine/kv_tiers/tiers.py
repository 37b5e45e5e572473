"""KVTiers: the engine pool's write-back tiers and the load-or-recompute choice.

A cached block the pool evicts is copied to the first tier (host memory); what that tier drops goes to the next
(disk). When a prompt's prefix continues past what the pool holds, `plan_hit` tells the KV cache manager which
tier holds each further block, and the manager asks `worth_loading` whether loading those bytes (at each tier's
measured bandwidth) beats recomputing those tokens (at the engine's measured seconds per prompt token): a load
must never make a request slower than a miss. Loaded blocks become ordinary cached blocks of the pool (the
scheduler sees computed tokens, as for any prefix hit); the tier keeps its copy.

Every change to what a tier holds is a KV event with the tier's medium (`CPU_TIER`, `DISK`), so a router can credit
hits in the tiers as well as in the pool.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence

import msgspec
import torch

from tokenfab.attention.backend import KVCache
from tokenfab.engine.block_hash import BlockHash, external_hash
from tokenfab.engine.block_pool import BlockKey
from tokenfab.engine.kv_events import KVEvent, record_removed, stored
from tokenfab.engine.kv_tiers.disk import MEDIUM_DISK, DiskTier
from tokenfab.engine.kv_tiers.host import MEDIUM_HOST
from tokenfab.engine.kv_tiers.store import TierStore
from tokenfab.engine.stats import TierStats

PRIOR_BANDWIDTH = {MEDIUM_HOST: 2e9, MEDIUM_DISK: 2e8}
"""Bytes per second assumed for a tier until its first load is measured."""
PRIOR_SECONDS_PER_TOKEN = 2e-4
"""Prompt seconds per token assumed until the engine has measured a prefill step."""
EWMA = 0.3


class KVTiers:
    def __init__(self, cache: KVCache, stores: Sequence[TierStore], write_through_hits: int = 0) -> None:
        """`stores` fastest first: a block the pool evicts goes to the first, what that one drops to the next;
        `write_through_hits` > 0 also copies a pool block to the first tier when it is hit that many times."""
        if not stores:
            raise ValueError("KVTiers needs at least one tier")
        self.cache = cache
        self.stores = list(stores)
        self.write_through_hits = write_through_hits
        self.events: list[KVEvent] | None = None
        """Where tier changes are recorded as KV events (the KV cache manager's list; None: not recorded)."""
        self.bandwidth = {s.medium: PRIOR_BANDWIDTH.get(s.medium, 2e8) for s in self.stores}
        self.seconds_per_token = PRIOR_SECONDS_PER_TOKEN
        self._measured_prefill = False
        self.stats = TierStats(media=",".join(store.medium for store in self.stores))
        self.block_bytes = [2 * k[:, :1].numel() * cache.block_size * k.element_size() for k in cache.k]
        """Bytes of one block's K and V, per window group."""

    # -- the pool's evictions --------------------------------------------------------------------------------------

    def save(self, group: int, block_id: int, h: BlockHash, key: BlockKey) -> None:
        """Keep a copy of a pool block in the first tier: the pool is about to reuse it (write-back, before its KV
        is overwritten), or it was hit often (write-through). A block the tier holds already is only refreshed."""
        self._reap()
        started = time.perf_counter()
        k, v = self.cache.block(group, block_id)
        self._put(0, group, h, key, k, v)
        self.stats.store_seconds += time.perf_counter() - started

    def _put(self, level: int, group: int, h: BlockHash, key: BlockKey, k: torch.Tensor, v: torch.Tensor) -> None:
        store = self.stores[level]

        def evicted(g: int, old: BlockHash, old_key: BlockKey | None, kv: torch.Tensor | None) -> None:
            self._removed(store, g, old)
            if kv is not None and old_key is not None and level + 1 < len(self.stores):
                self._put(level + 1, g, old, old_key, kv[0], kv[1])

        if store.put(group, h, key, k, v, evicted):
            self._count(store, "stored", 1)
            self._stored(store, group, h, key)

    # -- hits ------------------------------------------------------------------------------------------------------

    def find(self, group: int, h: BlockHash) -> int | None:
        """The level of the fastest tier holding the block, or None."""
        for level, store in enumerate(self.stores):
            if store.has(group, h):
                return level
        return None

    def worth_loading(self, tokens: int, blocks: Sequence[tuple[int, int]]) -> bool:
        """Whether loading `blocks` ((group, level) each) is predicted faster than recomputing `tokens` tokens."""
        seconds = sum(self.block_bytes[g] / self.bandwidth[self.stores[level].medium] for g, level in blocks)
        return seconds < tokens * self.seconds_per_token

    def fetch(self, group: int, h: BlockHash, key: BlockKey, level: int) -> torch.Tensor | None:
        """A copy of the block's KV from that tier (None: gone or failed its checks; it is then not held there)."""
        store = self.stores[level]
        started = time.perf_counter()
        kv = store.get(group, h, key)
        if kv is None:
            if not store.has(group, h):
                self._removed(store, group, h)
            return None
        self._measure(store.medium, kv.numel() * kv.element_size(), time.perf_counter() - started)
        return kv

    def write(self, group: int, block_id: int, kv: torch.Tensor, level: int, tokens: int) -> None:
        """Put a fetched block's KV into a pool block."""
        started = time.perf_counter()
        self.cache.write_block(group, block_id, kv)
        self.stats.load_seconds += time.perf_counter() - started
        self._count(self.stores[level], "hit_tokens", tokens)

    def declined(self) -> None:
        """A tier hit was recomputed because loading it was predicted slower."""
        self.stats.loads_declined += 1

    def _measure(self, medium: str, nbytes: int, seconds: float) -> None:
        self.stats.load_seconds += seconds
        if seconds > 0:
            self.bandwidth[medium] += EWMA * (nbytes / seconds - self.bandwidth[medium])

    def observe_step(self, prompt_tokens: int, tokens: int, seconds: float) -> None:
        """An engine step ran `tokens` tokens in `seconds`, `prompt_tokens` of them prompt: the recompute rate."""
        if prompt_tokens < 32 or tokens <= 0:
            return
        rate = seconds / tokens
        if not self._measured_prefill:
            self.seconds_per_token, self._measured_prefill = rate, True
        else:
            self.seconds_per_token += EWMA * (rate - self.seconds_per_token)

    # -- upkeep ----------------------------------------------------------------------------------------------------

    def clear(self) -> None:
        for store in self.stores:
            for g, h in store.clear():
                self._removed(store, g, h)

    def snapshot(self) -> TierStats:
        """The tiers' gauges and counters now."""
        self._reap()
        s = self.stats
        for store in self.stores:
            prefix = _PREFIX[store.medium]
            setattr(s, f"{prefix}_blocks", store.num_blocks)
            setattr(s, f"{prefix}_bytes", store.used_bytes)
            if isinstance(store, DiskTier):
                s.corrupt_blocks, s.disk_write_errors = store.corrupt, store.write_errors
        return msgspec.structs.replace(s)

    def _count(self, store: TierStore, what: str, n: int) -> None:
        name = f"{_PREFIX[store.medium]}_{what}"
        setattr(self.stats, name, getattr(self.stats, name) + n)

    def close(self) -> None:
        for store in self.stores:
            store.close()

    def _reap(self) -> None:
        """Blocks a disk tier could not write are not held: say so."""
        for store in self.stores:
            if isinstance(store, DiskTier):
                for g, h in store.take_failed():
                    self._removed(store, g, h)

    # -- events ----------------------------------------------------------------------------------------------------

    def _stored(self, store: TierStore, group: int, h: BlockHash, key: BlockKey) -> None:
        if self.events is not None:
            parent, tokens = key
            self.events.append(
                stored(
                    [external_hash(h)],
                    external_hash(parent) if parent is not None else None,
                    list(tokens),
                    self.cache.block_size,
                    store.medium,
                    group,
                    self.cache.groups[group].window,
                )
            )

    def _removed(self, store: TierStore, group: int, h: BlockHash) -> None:
        if self.events is not None:
            record_removed(self.events, external_hash(h), store.medium, group)


_PREFIX = {MEDIUM_HOST: "host", MEDIUM_DISK: "disk"}


def tier_namespace(*identity: object) -> str:
    """A directory name for one model's blocks: files of another model, weight format, dtype, block size or KV
    layout land elsewhere and are never loaded."""
    return hashlib.sha256(repr(identity).encode()).hexdigest()[:24]
