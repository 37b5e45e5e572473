"""What every KV tier offers: blocks of one window group, named by their stable hash and checked against their
key (parent hash and tokens) before they are handed out."""

from __future__ import annotations

import abc
from collections.abc import Callable

import torch

from tokenfab.attention.backend import KVCache
from tokenfab.engine.block_hash import BlockHash
from tokenfab.engine.block_pool import BlockKey


def block_bytes(cache: KVCache) -> list[int]:
    """Bytes of one block's K and V, per window group of the cache."""
    return [KVCache.bytes_per_block(k.shape[0], cache.block_size, k.shape[2], k.shape[3], k.dtype) for k in cache.k]


Evicted = Callable[[int, BlockHash, BlockKey | None, torch.Tensor | None], None]
"""(group, hash, key, KV [2, ...]) of a block a tier dropped; key and KV None where the tier no longer has them."""


class TierStore(abc.ABC):
    medium: str
    """How KV events name this tier (`CPU_TIER`, `DISK`)."""

    @abc.abstractmethod
    def has(self, group: int, h: BlockHash) -> bool:
        """Whether the tier holds this block (cheap: no data is read)."""

    @abc.abstractmethod
    def put(self, group: int, h: BlockHash, key: BlockKey, k: torch.Tensor, v: torch.Tensor, evicted: Evicted) -> bool:
        """Keep a copy of a block (`k`, `v`: [layers, block_size, kv_heads, head_dim], only read during the call);
        whether it was new here. Each block dropped to make room is first handed to `evicted` (with its key and
        KV where the tier still has them, for the tier below)."""

    @abc.abstractmethod
    def get(self, group: int, h: BlockHash, key: BlockKey) -> torch.Tensor | None:
        """A copy of the block's KV ([2, layers, block_size, kv_heads, head_dim]), or None when it is not here,
        holds other tokens or fails its checks (then dropped)."""

    @abc.abstractmethod
    def discard(self, group: int, h: BlockHash) -> bool:
        """Drop a block; whether it was held."""

    @abc.abstractmethod
    def held(self) -> list[tuple[int, BlockHash]]:
        """(group, hash) of every block held, least recently used first."""

    @abc.abstractmethod
    def clear(self) -> list[tuple[int, BlockHash]]:
        """Drop every block; returns what was held."""

    @property
    @abc.abstractmethod
    def num_blocks(self) -> int:
        """Blocks held now."""

    @property
    @abc.abstractmethod
    def used_bytes(self) -> int: ...

    @property
    @abc.abstractmethod
    def capacity_bytes(self) -> int: ...

    @abc.abstractmethod
    def close(self) -> None:
        """Finish pending work (a disk tier's writes)."""
