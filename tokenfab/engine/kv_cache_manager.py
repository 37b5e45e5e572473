"""KVCacheManager: block tables per request and window group, prefix-cache hits, slot allocation and freeing.

A model whose layers have different sliding windows (Gemma 3: 5 of 6 layers see 512 tokens) gets one pool per
window. A sliding group drops blocks that left the window, so it never holds more KV than the window needs; a
prefix hit must be backed in every group (the sliding group only needs the last window's blocks).

Blocks are named by stable chained hashes (`tokenfab.engine.block_hash`). With `record_events()` on, every change
to the set of cached blocks is kept as a KV event (`tokenfab.engine.kv_events`) until `take_events()`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from tokenfab.engine.block_hash import BlockHash, block_hash, external_hash
from tokenfab.engine.block_pool import NULL_BLOCK, BlockKey, BlockPool
from tokenfab.engine.kv_events import AllBlocksCleared, KVEvent, stored
from tokenfab.engine.stats import KVStats, PrefixCacheStats
from tokenfab.engine.types import KVTransferParams, Request, RequestStatus

if TYPE_CHECKING:
    import torch

    from tokenfab.engine.kv_tiers import KVTiers
    from tokenfab.engine.kv_transfer import ExportTable, KVPuller

Load = Callable[[int], None]
"""Writes a block's KV, got from elsewhere (a tier, a prefill replica), into the given pool block."""


def _writer(write: Callable[..., None], group: int, kv: torch.Tensor, *rest: object) -> Load:
    """A Load that calls write(group, block_id, kv, *rest)."""

    def load(block_id: int) -> None:
        write(group, block_id, kv, *rest)

    return load


@dataclass(slots=True)
class _ReqState:
    tables: list[list[int]]
    hashes: list[BlockHash] = field(default_factory=list)
    keys: list[BlockKey] = field(default_factory=list)
    registered: int = 0
    """Leading blocks already offered to the prefix cache."""


MAX_KEPT = 4096
"""Kept sequences `prefetch` watches at most."""


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
        self.tiers: KVTiers | None = None
        self._kept: dict[str, tuple[float, list[BlockHash], list[BlockKey]]] = {}
        """Finished sequences whose KV is kept (`keep_kv_s`): deadline and full blocks, for `prefetch`."""
        self._reclaimed_seen = 0
        self._still_missing = False
        self.exports: ExportTable | None = None
        self.puller: KVPuller | None = None

    def attach_tiers(self, tiers: KVTiers) -> None:
        """Write evicted blocks back to `tiers` and load prefix hits from them (`KVTiers`)."""
        self.tiers = tiers
        tiers.events = self._events
        for pool in self.pools:
            pool.on_evict = tiers.save

    def attach_transfer(self, exports: ExportTable, puller: KVPuller) -> None:
        """Hold finished prefill legs' blocks in `exports` for decode replicas, and pull a decode leg's prompt
        blocks from its prefill replica with `puller` (tokenfab.engine.kv_transfer)."""
        self.exports, self.puller = exports, puller

    # -- KV events ----------------------------------------------------------------------------------------------

    def record_events(self) -> None:
        """Start keeping KV events (stores, evictions, clears) until they are taken."""
        if self._events is None:
            self._events = []
            for pool in self.pools:
                pool.events = self._events
            if self.tiers is not None:
                self.tiers.events = self._events

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
        if self.tiers is not None:
            self.tiers.clear()
        self._kept.clear()

    def block_tables(self, request_id: str) -> tuple[list[int], ...]:
        return tuple(self.requests[request_id].tables)

    def capacity_tokens(self) -> int:
        """Longest sequence that can ever fit alone (bounded by the smallest full-attention pool)."""
        caps = [(p.num_blocks - 1) * self.block_size for p, w in zip(self.pools, self.windows) if w is None]
        return min(caps) if caps else 1 << 62

    def kv_stats(self) -> KVStats:
        for pool in self.pools:
            pool.expire()
        return KVStats(
            self.usage,
            sum(self.num_free_blocks()),
            sum(p.num_blocks - 1 for p in self.pools),
            sum(len(p.pinned) for p in self.pools),
            sum(p.pin_expiries for p in self.pools),
            sum(p.pins_reclaimed for p in self.pools),
        )

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

    def _hit_limit(self, held: list[list[bool]]) -> int:
        """Longest prefix (in blocks) backed in every group, given which blocks each group holds."""
        limit = len(held[0]) if held else 0
        for g, window in enumerate(self.windows):
            if window is None:
                run = 0
                while run < limit and held[g][run]:
                    run += 1
                limit = run
        # Backing a hit of n blocks in a sliding group is not monotonic in n, so test every group at each n.
        while limit > 0 and not all(all(held[g][self._first_kept(g, limit) : limit]) for g in range(len(held))):
            limit -= 1
        return limit

    def _first_kept(self, g: int, n: int) -> int:
        """The first of n blocks that the next token's window needs in group g (0 for full attention)."""
        window = self.windows[g]
        return 0 if window is None else max(0, n * self.block_size - window + 1) // self.block_size

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
        found = [[p.lookup(h, k) for h, k in zip(state.hashes, state.keys)] for p in self.pools]
        n = self._hit_limit([[b is not None for b in f] for f in found])
        loads: dict[tuple[int, int], Load] = {}
        remote = request.kv_transfer
        if remote is not None and remote.do_remote_prefill and self.puller is not None:
            request.kv_transfer = None  # one try: after a preemption the prompt is recomputed (or hit in the pool)
            if n < len(state.hashes):
                n, loads = self._remote_hit(remote, state, found, n)
            else:
                self.puller.release(remote)  # the pool holds the whole prompt already
        if self.tiers is not None and n < len(state.hashes) and not loads:
            n, loads = self._tier_hit(state, found, n)
        self.stats.queries += request.num_tokens
        self.stats.hits += n * self.block_size
        # References on the pool's blocks first, so that allocating blocks for the loads cannot evict them.
        for g, pool in enumerate(self.pools):
            first_kept = self._first_kept(g, n)
            for i in range(n):
                block_id = found[g][i] if i >= first_kept else NULL_BLOCK
                if block_id is not None and block_id != NULL_BLOCK:
                    pool.touch(block_id)
                    self._hit(g, block_id)
                state.tables[g].append(NULL_BLOCK if block_id is None else block_id)
        for (g, i), load in loads.items():
            block_id = self.pools[g].allocate()
            load(block_id)
            state.tables[g][i] = block_id
        self._register_loaded(state, sorted(loads))
        state.registered = n
        return n * self.block_size

    def _hit(self, g: int, block_id: int) -> None:
        """Count a prefix hit on a pool block; with write-through, a block hit often enough is copied to the first
        tier now, so that its eviction later costs nothing."""
        block = self.pools[g].blocks[block_id]
        block.hits += 1
        tiers = self.tiers
        if tiers is not None and tiers.write_through_hits and block.hits == tiers.write_through_hits:
            assert block.hash is not None and block.key is not None  # a hit is on a cached block
            tiers.save(g, block_id, block.hash, block.key)

    def _remote_hit(
        self, params: KVTransferParams, state: _ReqState, found: list[list[int | None]], n_pool: int
    ) -> tuple[int, dict[tuple[int, int], Load]]:
        """The prefix a prefill replica's export extends the pool's hit to (blocks whose hashes agree with this
        prompt's, and only those the pool lacks: a sliding group's only within its window): (blocks, a load per
        (group, position) to pull). The export is released whatever happens; a failed pull leaves the pool's hit."""
        puller, exports = self.puller, self.exports
        assert puller is not None and exports is not None
        stats = exports.stats
        started = time.perf_counter()
        remote = puller.describe(params)
        if remote is None:
            stats.failures += 1
            return n_pool, {}
        loads: dict[tuple[int, int], Load] = {}
        n = n_pool
        try:
            agree = 0
            while agree < min(len(remote.hashes), len(state.hashes)) and remote.hashes[agree] == state.hashes[agree]:
                agree += 1
            held = [
                [found[g][i] is not None or (i < agree and remote.tables[g][i] != NULL_BLOCK) for i in range(agree)]
                + [f is not None for f in found[g][agree:]]
                for g in range(len(self.pools))
            ]
            n = self._hit_limit(held)
            wanted = [
                (g, i) for g in range(len(self.pools)) for i in range(self._first_kept(g, n), n) if found[g][i] is None
            ]
            room = all(
                sum(1 for w in wanted if w[0] == g) <= pool.num_free - self._free_hits(g, found, n)
                for g, pool in enumerate(self.pools)
            )
            if n <= n_pool or not room:
                return n_pool, {}
            blocks = puller.fetch(params, remote, wanted)
            if blocks is None:
                stats.failures += 1
                return n_pool, {}
            for (g, i), kv in zip(wanted, blocks):
                loads[(g, i)] = _writer(puller.cache.write_block, g, kv)
            stats.pulls += 1
            stats.pulled_blocks += len(blocks)
            stats.pulled_bytes += sum(b.numel() * b.element_size() for b in blocks)
            return n, loads
        finally:
            puller.release(params)
            stats.pull_seconds += time.perf_counter() - started

    def _tier_hit(
        self, state: _ReqState, found: list[list[int | None]], n_pool: int
    ) -> tuple[int, dict[tuple[int, int], Load]]:
        """The prefix the tiers extend the pool's hit to, if loading it beats recomputing it: (blocks, the fetched
        KV of each (group, position) to load with its tier level)."""
        tiers = self.tiers
        assert tiers is not None
        levels = [
            [None if b is not None else tiers.find(g, h) for b, h in zip(found[g], state.hashes)]
            for g in range(len(self.pools))
        ]
        failed: set[tuple[int, int]] = set()
        for deepest in range(len(tiers.stores) - 1, -1, -1):
            while True:
                held = [
                    [
                        b is not None or (lv is not None and lv <= deepest and (g, i) not in failed)
                        for i, (b, lv) in enumerate(zip(found[g], levels[g]))
                    ]
                    for g in range(len(self.pools))
                ]
                n = self._hit_limit(held)
                if n <= n_pool:
                    break
                wanted = [
                    (g, i, lv)
                    for g in range(len(self.pools))
                    for i in range(self._first_kept(g, n), n)
                    if found[g][i] is None and (lv := levels[g][i]) is not None
                ]
                room = all(
                    sum(1 for w in wanted if w[0] == g) <= pool.num_free - self._free_hits(g, found, n)
                    for g, pool in enumerate(self.pools)
                )
                if not room:
                    break
                if not tiers.worth_loading((n - n_pool) * self.block_size, [(g, lv) for g, _, lv in wanted]):
                    tiers.declined()
                    break
                loads: dict[tuple[int, int], Load] = {}
                for g, i, lv in wanted:
                    kv = tiers.fetch(g, state.hashes[i], state.keys[i], lv)
                    if kv is None:
                        failed.add((g, i))
                        break
                    loads[(g, i)] = _writer(tiers.write, g, kv, lv, self.block_size)
                else:
                    return n, loads
        return n_pool, {}

    def _free_hits(self, g: int, found: list[list[int | None]], n: int) -> int:
        """Blocks of an n-block hit that sit unused in group g's free queue (touching them takes them out)."""
        pool = self.pools[g]
        return sum(1 for b in found[g][self._first_kept(g, n) : n] if b is not None and pool.blocks[b].ref_count == 0)

    def _register_loaded(self, state: _ReqState, loaded: list[tuple[int, int]]) -> None:
        """Make loaded blocks findable like computed ones (and announce them, as stored in the pool)."""
        for g, pool in enumerate(self.pools):
            new = [
                i for gg, i in loaded if gg == g and pool.register(state.tables[g][i], state.hashes[i], state.keys[i])
            ]
            self._announce(g, state.hashes, state.keys, new)

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
            self._announce(g, state.hashes, state.keys, new)
        state.registered = full

    def _announce(self, g: int, hashes: list[BlockHash], keys: list[BlockKey], new: list[int]) -> None:
        """One BlockStored per run of consecutive newly cached blocks (a block whose contents another block
        already holds is not announced again)."""
        if new and self._events is not None:
            starts = [k for k in range(len(new)) if k == 0 or new[k] != new[k - 1] + 1] + [len(new)]
            for x, y in zip(starts, starts[1:]):
                run, first = new[x:y], new[x]
                self._events.append(
                    stored(
                        [external_hash(hashes[i]) for i in run],
                        external_hash(hashes[first - 1]) if first > 0 else None,
                        [t for i in run for t in keys[i][1]],
                        self.block_size,
                        self.medium,
                        g,
                        self.windows[g],
                    )
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
        """Release in reverse so a sequence's tail is evicted before its (more shareable) head; a request that
        keeps its KV (`keep_kv_s`) pins its cached blocks until then."""
        transfer = request.kv_transfer
        if transfer is not None and transfer.do_remote_prefill and self.puller is not None:
            # Never admitted (an admitted one has used its params): nothing will be pulled, let the export go.
            request.kv_transfer = None
            self.puller.release(transfer)
        state = self.requests.pop(request.request_id, None)
        if state is None:
            return
        if (
            transfer is not None
            and transfer.do_remote_decode
            and self.exports is not None
            and request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
        ):
            # A prefill leg: its blocks stay referenced, held for the decode replica that will pull them.
            self.exports.hold(request.request_id, state.tables, state.hashes[: state.registered])
            return
        keep = request.params.keep_kv_s
        until = time.monotonic() + keep if keep > 0 else None
        for pool, table in zip(self.pools, state.tables):
            for block_id in reversed(table):
                pool.release(block_id, keep_until=until)
        if until is not None and self.tiers is not None and state.registered:
            n = state.registered
            self._kept[request.request_id] = (until, state.hashes[:n], state.keys[:n])
            while len(self._kept) > MAX_KEPT:  # the oldest first
                del self._kept[next(iter(self._kept))]

    def settle_exports(self) -> int:
        """Free the blocks of held prefill legs that were released or timed out; returns how many exports."""
        if self.exports is None:
            return 0
        done = self.exports.settle()
        for export in done:
            for pool, table in zip(self.pools, export.tables):
                for block_id in reversed(table):
                    pool.release(block_id)
        return len(done)

    def prefetch(self, max_blocks: int = 16) -> int:
        """Bring blocks of kept sequences (a session's last turn, until its TTL) that the pool had to give up back
        from the tiers, pinned again, so the session's next turn finds them in the pool. Only while a quarter of
        the pool is free and unpinned (the least recently used cached blocks it then takes are written back to the
        tiers in turn), at most `max_blocks` per call; returns how many were loaded."""
        tiers = self.tiers
        if tiers is None or not self._kept:
            return 0
        reclaimed = sum(p.pins_reclaimed for p in self.pools)
        if reclaimed == self._reclaimed_seen and not self._still_missing:
            return 0  # no kept block was given up since the last pass found them all
        self._reclaimed_seen, self._still_missing = reclaimed, False
        now, loaded = time.monotonic(), 0
        for request_id, (until, hashes, keys) in list(self._kept.items()):
            missing = False
            for g, pool in enumerate(self.pools):
                for i in range(self._first_kept(g, len(hashes)), len(hashes)):
                    if until <= now:
                        break
                    if pool.lookup(hashes[i], keys[i]) is not None:
                        continue
                    level = tiers.find(g, hashes[i])
                    if level is None:
                        continue  # gone from the tiers too: nothing to bring back
                    if loaded >= max_blocks or len(pool.free) <= pool.num_blocks // 4:
                        missing = True
                        continue
                    block_id = pool.allocate()
                    kv = tiers.fetch(g, hashes[i], keys[i], level)
                    if kv is None or not pool.register(block_id, hashes[i], keys[i]):
                        pool.release(block_id, reuse_first=True)
                        continue
                    tiers.write(g, block_id, kv, level, 0)
                    tiers.stats.prefetched_blocks += 1
                    self._announce(g, hashes, keys, [i])
                    pool.release(block_id, keep_until=until)
                    loaded += 1
            if until <= now:
                del self._kept[request_id]
            self._still_missing = self._still_missing or missing
        return loaded

    def num_free_blocks(self) -> list[int]:
        return [p.num_free for p in self.pools]

    def check_integrity(self) -> None:
        refs = [[0] * p.num_blocks for p in self.pools]
        held = [e.tables for e in self.exports.held()] if self.exports is not None else []
        for tables in [state.tables for state in self.requests.values()] + held:
            for g, table in enumerate(tables):
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
