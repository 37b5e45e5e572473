"""Split the KV memory budget into blocks per window group.

Full-attention groups get the same number of blocks N. A sliding-window group never needs more than a window's
worth of blocks per running request (plus one step's new tokens), so it gets min(N, that cap) and the memory it
does not need goes to N.
"""

from __future__ import annotations

import torch

from tokenfab.attention.backend import KVCache, KVGroupSpec
from tokenfab.config import EngineConfig
from tokenfab.models.arch import ArchConfig


def sliding_cap(window: int, config: EngineConfig) -> int:
    per_seq = -(-window // config.block_size) + 1
    return config.max_num_seqs * per_seq + -(-config.max_num_batched_tokens // config.block_size) + 1


def plan_kv_blocks(
    config: EngineConfig, arch: ArchConfig, groups: list[KVGroupSpec], dtype: torch.dtype, max_model_len: int
) -> list[int]:
    """Blocks per group (the null block included)."""
    budget = int(config.kv_cache_memory_gb * (1 << 30))
    per_block = [
        KVCache.bytes_per_block(len(g.layers), config.block_size, *arch.kv_cache_layout, dtype) for g in groups
    ]
    caps = [None if g.window is None else sliding_cap(g.window, config) for g in groups]
    n = budget // sum(per_block)
    for _ in range(len(groups)):
        capped = [i for i, c in enumerate(caps) if c is not None and c < n]
        fixed = sum((caps[i] or 0) * per_block[i] for i in capped)
        free_bytes = sum(per_block[i] for i in range(len(groups)) if i not in capped)
        if not free_bytes:
            break
        n = (budget - fixed) // free_bytes
    blocks = [min(n, c) if c is not None else n for c in caps]
    needed = -(-max_model_len // config.block_size) + 1
    for g, b in zip(groups, blocks):
        need = needed if g.window is None else min(needed, -(-g.window // config.block_size) + 2)
        if b < need:
            raise ValueError(
                f"kv_cache_memory_gb={config.kv_cache_memory_gb} holds {b} blocks for layers "
                f"{list(g.layers)}; max_model_len={max_model_len} needs {need}"
            )
    return blocks
