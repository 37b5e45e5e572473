"""KVCacheManager: block tables per request and window group, prefix-cache hits, slot allocation and freeing.

A model whose layers have different sliding windows (Gemma 3: 5 of 6 layers see 512 tokens) gets one pool per
window. A sliding group drops blocks that left the window, so it never holds more KV than the window needs; a
prefix hit must be backed in every group (the sliding group only needs the last window's blocks).

Blocks are named by stable chained hashes (`tokenfab.engine.block_hash`). With `record_events()` on, every change
to the set of cached blocks is kept as a KV event (`tokenfab.engine.kv_events`) until `take_events()`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgspec

from tokenfab.engine.block_hash import BlockHash, block_hash, external_hash
from tokenfab.engine.block_pool import NULL_BLOCK, BlockKey, BlockPool
from tokenfab.engine.kv_events import AllBlocksCleared, BlockStored, KVEvent
from tokenfab.engine.stats import KVStats, PrefixCacheStats
from tokenfab.engine.types import Request


@dataclass(slots=True)
class _ReqState:
    tables: list[list[int]]
    hashes: list[BlockHash] = field(default_factory=list)
    keys: list[BlockKey] = field(default_factory=list)
    registered: int = 0
    """Leading blocks already offered to the prefix cache."""


class KVCacheManager:
    def __init__(
        self,
        windows: list[int | None],
        blocks_per_group: list[int],
        block_size: int,
        enable_prefix_caching: bool = True,
        medium: str | None = None,
    ) -> None:
        self.windows = windows
        self.block_size = block_size
        self.pools = [BlockPool(n, g, medium) for g, n in enumerate(blocks_per_group)]
        self.enable_prefix_caching = enable_prefix_caching
        self.requests: dict[str, _ReqState] = {}
        self.stats = PrefixCacheStats()
        self.medium = medium
        self._events: list[KVEvent] | None = None

    # -- KV events ----------------------------------------------------------------------------------------------

    def record_events(self) -> None:
        """Start keeping KV events (stores, evictions, clears) until they are taken."""
        if self._events is None:
            self._events = []
            for pool in self.pools:
                pool.events = self._events

    def take_events(self) -> list[KVEvent]:
        """The events since the last call, oldest first (empty when not recording)."""
        events = self._events
        if not events:
            return []
        taken = list(events)
        events.clear()
        return taken

    def cached_block_hashes(self) -> set[tuple[int, int]]:
        """`(group_idx, 64-bit hash)` of every block a request can hit now: what the events describe."""
        return {(g, external_hash(h)) for g, pool in enumerate(self.pools) for h in pool.cached}

    def reset_prefix_cache(self) -> None:
        """Forget every cached hash: running requests keep their blocks, but nothing cached so far is found again
        (blocks they fill later are registered as usual)."""
        for pool in self.pools:
            pool.clear_cache()
        if self._events is not None:
            self._events.append(AllBlocksCleared())

    def block_tables(self, request_id: str) -> tuple[list[int], ...]:
        return tuple(self.requests[request_id].tables)

    def capacity_tokens(self) -> int:
        """Longest sequence that can ever fit alone (bounded by the smallest full-attention pool)."""
        caps = [(p.num_blocks - 1) * self.block_size for p, w in zip(self.pools, self.windows) if w is None]
        return min(caps) if caps else 1 << 62

    def kv_stats(self) -> KVStats:
        return KVStats(self.usage, sum(self.num_free_blocks()), sum(p.num_blocks - 1 for p in self.pools))

    def prefix_stats(self) -> PrefixCacheStats:
        return msgspec.structs.replace(self.stats)

    @property
    def usage(self) -> float:
        used = sum(p.num_blocks - 1 - p.num_free for p in self.pools)
        return used / sum(p.num_blocks - 1 for p in self.pools)

    # -- prefix cache -------------------------------------------------------------------------------------------

    def _hashes(self, request: Request, state: _ReqState, upto_tokens: int) -> None:
        """Extend the request's chained block hashes to cover the full blocks among its first upto_tokens."""
        tokens = request.all_token_ids
        bs = self.block_size
        for i in range(len(state.hashes), upto_tokens // bs):
            parent = state.hashes[-1] if state.hashes else None
            key = (parent, tuple(tokens[i * bs : (i + 1) * bs]))
            state.keys.append(key)
            state.hashes.append(block_hash(*key))

    def _hit_blocks(self, state: _ReqState) -> tuple[int, list[list[int | None]]]:
        """Longest prefix (in blocks) backed in every group, and the cached block ids per group."""
        found = [[p.lookup(h, k) for h, k in zip(state.hashes, state.keys)] for p in self.pools]
        limit = len(state.hashes)
        for g, window in enumerate(self.windows):
            if window is None:
                run = 0
                while run < limit and found[g][run] is not None:
                    run += 1
                limit = run
        # Backing a hit of n blocks in a sliding group is not monotonic in n, so test every group at each n.
        while limit > 0 and not all(
            self._sliding_backs(found[g], limit, w) for g, w in enumerate(self.windows) if w is not None
        ):
            limit -= 1
        return limit, found

    def _sliding_backs(self, found: list[int | None], n: int, window: int) -> bool:
        """Whether the blocks the next token's window needs after an n-block hit are all cached."""
        first_needed = max(0, n * self.block_size - window + 1) // self.block_size
        return all(b is not None for b in found[first_needed:n])

    def get_computed_blocks(self, request: Request) -> int:
        """Admit a request: take references on its cached prefix; returns the number of computed tokens."""
        state = _ReqState(tables=[[] for _ in self.pools])
        self.requests[request.request_id] = state
        if not self.enable_prefix_caching:
            return 0
        # The last prompt token is always recomputed: its logits are needed to sample.
        self._hashes(request, state, request.num_tokens - 1)
        if request.params.prompt_logprobs is not None:
            return 0  # every prompt position's logits are wanted: none may be skipped
        n, found = self._hit_blocks(state)
        self.stats.queries += request.num_tokens
        self.stats.hits += n * self.block_size
        for g, (pool, window) in enumerate(zip(self.pools, self.windows)):
            first_kept = 0 if window is None else max(0, n * self.block_size - window + 1) // self.block_size
            for i in range(n):
                if i < first_kept:
                    state.tables[g].append(NULL_BLOCK)
                else:
                    block_id = found[g][i]
                    assert block_id is not None  # _hit_blocks checked every block it counts
                    pool.touch(block_id)
                    state.tables[g].append(block_id)
        state.registered = n
        return n * self.block_size

    # -- allocation ---------------------------------------------------------------------------------------------

    def _drop_out_of_window(self, g: int, state: _ReqState, num_computed: int) -> None:
        window = self.windows[g]
        if window is None:
            return
        table = state.tables[g]
        first_needed = max(0, num_computed - window + 1) // self.block_size
        for i in range(min(first_needed, len(table))):
            if table[i] != NULL_BLOCK:
                self.pools[g].release(table[i])
                table[i] = NULL_BLOCK

    def allocate_slots(self, request: Request, num_new_tokens: int) -> bool:
        """Make room for num_new_tokens more tokens; all or nothing."""
        state = self.requests[request.request_id]
        total_blocks = -(-(request.num_computed_tokens + num_new_tokens) // self.block_size)
        for g in range(len(self.pools)):
            self._drop_out_of_window(g, state, request.num_computed_tokens)
        needed = [max(0, total_blocks - len(t)) for t in state.tables]
        if any(n > pool.num_free for n, pool in zip(needed, self.pools)):
            return False
        for table, pool, n in zip(state.tables, self.pools, needed):
            table.extend(pool.allocate() for _ in range(n))
        return True

    def cache_full_blocks(self, request: Request) -> None:
        """Register blocks that became full of computed tokens so later requests can reuse them."""
        if not self.enable_prefix_caching:
            return
        state = self.requests[request.request_id]
        self._hashes(request, state, request.num_computed_tokens)
        full = request.num_computed_tokens // self.block_size
        if full <= state.registered:
            return
        for g, (pool, table) in enumerate(zip(self.pools, state.tables)):
            new = [
                i
                for i in range(state.registered, full)
                if table[i] != NULL_BLOCK and pool.register(table[i], state.hashes[i], state.keys[i])
            ]
            if new and self._events is not None:
                # One BlockStored per run of consecutive newly cached blocks (a block whose contents another
                # block already holds is not announced again).
                starts = [k for k in range(len(new)) if k == 0 or new[k] != new[k - 1] + 1] + [len(new)]
                self._events.extend(self._stored(g, state, new[x:y]) for x, y in zip(starts, starts[1:]))
        state.registered = full

    def _stored(self, g: int, state: _ReqState, run: list[int]) -> BlockStored:
        first = run[0]
        window = self.windows[g]
        return BlockStored(
            block_hashes=[external_hash(state.hashes[i]) for i in run],
            parent_block_hash=external_hash(state.hashes[first - 1]) if first > 0 else None,
            token_ids=[t for i in run for t in state.keys[i][1]],
            block_size=self.block_size,
            lora_id=None,
            medium=self.medium,
            lora_name=None,
            group_idx=g,
            kv_cache_spec_kind="full_attention" if window is None else "sliding_window",
            kv_cache_spec_sliding_window=window,
        )

    def rollback(self, request: Request) -> None:
        """Give back the trailing blocks that hold no computed token: after a step that verified draft tokens,
        those of the rejected drafts. They were never registered (only blocks full of computed tokens are), so
        the prefix cache only ever covers accepted tokens; a kept partial block's stale slots are overwritten
        when the sequence grows into them."""
        state = self.requests[request.request_id]
        keep = -(-request.num_computed_tokens // self.block_size)
        for pool, table in zip(self.pools, state.tables):
            while len(table) > keep:
                pool.release(table.pop(), reuse_first=True)

    def free(self, request: Request) -> None:
        """Release in reverse so a sequence's tail is evicted before its (more shareable) head."""
        state = self.requests.pop(request.request_id, None)
        if state is None:
            return
        for pool, table in zip(self.pools, state.tables):
            for block_id in reversed(table):
                pool.release(block_id)

    def num_free_blocks(self) -> list[int]:
        return [p.num_free for p in self.pools]

    def check_integrity(self) -> None:
        refs = [[0] * p.num_blocks for p in self.pools]
        for state in self.requests.values():
            for g, table in enumerate(state.tables):
                for block_id in table:
                    if block_id != NULL_BLOCK:
                        refs[g][block_id] += 1
        for g, pool in enumerate(self.pools):
            pool.check_integrity()
            for block in pool.blocks[1:]:
                assert block.ref_count == refs[g][block.block_id], (
                    f"group {g} block {block.block_id}: ref_count {block.ref_count} "
                    f"but {refs[g][block.block_id]} tables"
                )
