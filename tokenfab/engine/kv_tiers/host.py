"""HostTier: a memory arena of its own budget beside the engine's pool, one per window group, blocks kept in LRU
order. On a GPU it is pinned host memory; on a CPU it is more of the same DRAM, outside the pool the scheduler
allocates from, so it holds what the pool had to give up."""

from __future__ import annotations

from collections import OrderedDict

import torch

from tokenfab.attention.backend import KVCache
from tokenfab.engine.block_hash import BlockHash
from tokenfab.engine.block_pool import BlockKey
from tokenfab.engine.kv_tiers.store import Evicted, TierStore, block_bytes

MEDIUM_HOST = "CPU_TIER"


class HostTier(TierStore):
    medium = MEDIUM_HOST

    def __init__(self, shapes: list[tuple[int, ...]], slots: list[int], dtype: torch.dtype, pin: bool = False) -> None:
        """shapes: per group, one block's [2, layers, block_size, kv_heads, head_dim]; slots: blocks per group."""
        self._arenas = [
            torch.empty((n, *shape), dtype=dtype, pin_memory=pin) if n else torch.empty(0, dtype=dtype)
            for shape, n in zip(shapes, slots)
        ]
        self._bytes = [a[0].numel() * a.element_size() if len(a) else 0 for a in self._arenas]
        self._index: list[OrderedDict[BlockHash, tuple[int, BlockKey]]] = [OrderedDict() for _ in shapes]
        self._free: list[list[int]] = [list(range(n - 1, -1, -1)) for n in slots]

    @classmethod
    def for_cache(cls, cache: KVCache, budget_bytes: float) -> HostTier:
        """A tier of `budget_bytes` for this cache's blocks, shared between its groups as the pool shares its
        memory."""
        sizes = block_bytes(cache)
        weights = [n * b for n, b in zip(cache.blocks_per_group, sizes)]
        slots = [int(budget_bytes * w / sum(weights) // b) for w, b in zip(weights, sizes)]
        shapes: list[tuple[int, ...]] = [(2, k.shape[0], cache.block_size, k.shape[2], k.shape[3]) for k in cache.k]
        return cls(shapes, slots, cache.k[0].dtype, pin=cache.k[0].is_cuda)

    @property
    def slots(self) -> list[int]:
        """Blocks each group's arena holds."""
        return [len(a) for a in self._arenas]

    def has(self, group: int, h: BlockHash) -> bool:
        return h in self._index[group]

    def put(self, group: int, h: BlockHash, key: BlockKey, k: torch.Tensor, v: torch.Tensor, evicted: Evicted) -> bool:
        index, arena = self._index[group], self._arenas[group]
        if h in index:
            index.move_to_end(h)
            return False
        if not len(arena):
            return False
        if not self._free[group]:
            old, (slot, old_key) = index.popitem(last=False)
            evicted(group, old, old_key, arena[slot])
            self._free[group].append(slot)
        slot = self._free[group].pop()
        arena[slot, 0].copy_(k)
        arena[slot, 1].copy_(v)
        index[h] = (slot, key)
        return True

    def get(self, group: int, h: BlockHash, key: BlockKey) -> torch.Tensor | None:
        index = self._index[group]
        found = index.get(h)
        if found is None or found[1] != key:
            return None
        index.move_to_end(h)
        return self._arenas[group][found[0]].clone()

    def discard(self, group: int, h: BlockHash) -> bool:
        found = self._index[group].pop(h, None)
        if found is None:
            return False
        self._free[group].append(found[0])
        return True

    def held(self) -> list[tuple[int, BlockHash]]:
        return [(g, h) for g, index in enumerate(self._index) for h in index]

    def clear(self) -> list[tuple[int, BlockHash]]:
        held = self.held()
        for g, h in held:
            self.discard(g, h)
        return held

    @property
    def num_blocks(self) -> int:
        return sum(len(i) for i in self._index)

    @property
    def used_bytes(self) -> int:
        return sum(len(i) * b for i, b in zip(self._index, self._bytes))

    @property
    def capacity_bytes(self) -> int:
        return sum(len(a) * b for a, b in zip(self._arenas, self._bytes))

    def close(self) -> None:
        """Nothing is pending: every put is done when it returns."""
