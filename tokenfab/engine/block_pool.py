"""BlockPool: fixed-size KV blocks of one window group with refcounts, a verified prefix-hash map and LRU reuse.

Block 0 is the null block: it pads block tables (sliding-window layers drop blocks that left the window) and is
never handed out. Free blocks keep their hash until they are reused, so a later request can still hit them; the
free queue is ordered least-recently-freed first, and that is the eviction order. A block released with a
deadline (a session's KV kept for its next turn) is pinned instead: it is handed out only when the free queue is
empty (earliest deadline first), and joins the free queue when its deadline passes. Hashes are the stable chained
digests of `tokenfab.engine.block_hash`; with an event list attached, every eviction of a cached block is recorded
there as a `BlockRemoved`.
"""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from tokenfab.engine.block_hash import BlockHash, external_hash
from tokenfab.engine.kv_events import KVEvent, record_removed

NULL_BLOCK = 0

BlockKey = tuple[BlockHash | None, tuple[int, ...]]
"""(parent block's hash, this block's tokens): what a hash hit is verified against."""


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    hash: BlockHash | None = None
    key: BlockKey | None = None
    hits: int = 0
    """Requests that found it cached since it was filled."""


class BlockPool:
    def __init__(self, num_blocks: int, group_idx: int = 0, medium: str | None = None) -> None:
        if num_blocks < 2:
            raise ValueError("a block pool needs at least 2 blocks (one is the null block)")
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(1, num_blocks))
        self.cached: dict[BlockHash, int] = {}
        self.evictions = 0
        self.pinned: dict[int, float] = {}
        """Unused cached blocks kept until a deadline (time.monotonic()) -> that deadline."""
        self._deadlines: list[tuple[float, int]] = []
        self.pin_expiries = 0
        """Pinned blocks whose deadline passed (they joined the free queue)."""
        self.pins_reclaimed = 0
        """Pinned blocks handed out before their deadline because nothing else was free."""
        self.group_idx = group_idx
        self.medium = medium
        self.events: list[KVEvent] | None = None
        """Where evictions are recorded (None: not recorded)."""
        self.on_evict: Callable[[int, int, BlockHash, BlockKey], None] | None = None
        """Called with (group, block id, hash, key) just before a cached block is handed out again, while it still
        holds its KV (the KV tiers keep a copy)."""

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (cached-but-unused ones included, pinned ones too)."""
        return len(self.free) + len(self.pinned)

    def allocate(self) -> int:
        self.expire()
        if self.free:
            block_id, _ = self.free.popitem(last=False)
        else:
            block_id = self._earliest_pinned()
            del self.pinned[block_id]
            self.pins_reclaimed += 1
        block = self.blocks[block_id]
        if block.hash is not None:
            if self.on_evict is not None and block.key is not None:
                self.on_evict(self.group_idx, block_id, block.hash, block.key)
            del self.cached[block.hash]
            if self.events is not None:
                self._record_removed(block.hash)
            block.hash = block.key = None
            self.evictions += 1
        block.hits = 0
        block.ref_count = 1
        return block_id

    def _record_removed(self, h: BlockHash) -> None:
        assert self.events is not None
        record_removed(self.events, external_hash(h), self.medium, self.group_idx)

    def lookup(self, h: BlockHash, key: BlockKey) -> int | None:
        """A cached block holding exactly these tokens after exactly this parent, or None."""
        block_id = self.cached.get(h)
        if block_id is None or self.blocks[block_id].key != key:
            return None
        return block_id

    def _earliest_pinned(self) -> int:
        while True:
            deadline, block_id = heapq.heappop(self._deadlines)
            if self.pinned.get(block_id) == deadline:
                return block_id

    def expire(self, now: float | None = None) -> None:
        """Pinned blocks whose deadline has passed join the free queue (as if released now)."""
        if not self._deadlines:
            return  # nothing pinned: the common case, on every allocation
        now = time.monotonic() if now is None else now
        while self._deadlines and self._deadlines[0][0] <= now:
            deadline, block_id = heapq.heappop(self._deadlines)
            if self.pinned.get(block_id) == deadline:
                del self.pinned[block_id]
                self.free[block_id] = None
                self.pin_expiries += 1

    def touch(self, block_id: int) -> None:
        """Take a reference on a cached block (reviving it from the free queue, or its pin, if unused)."""
        block = self.blocks[block_id]
        if block.ref_count == 0:
            if self.pinned.pop(block_id, None) is None:
                del self.free[block_id]
        block.ref_count += 1

    def release(self, block_id: int, reuse_first: bool = False, keep_until: float | None = None) -> None:
        """Drop a reference; an unused block joins the free queue at its end (evicted last), or at its front
        with reuse_first (a block that never held reusable KV, so nothing is lost by handing it out first), or
        with keep_until (a cached block) is pinned until then."""
        if block_id == NULL_BLOCK:
            return
        block = self.blocks[block_id]
        if block.ref_count <= 0:
            raise RuntimeError(f"block {block_id} released with ref_count {block.ref_count}")
        block.ref_count -= 1
        if block.ref_count == 0:
            if keep_until is not None and block.hash is not None:
                self.pinned[block_id] = keep_until
                heapq.heappush(self._deadlines, (keep_until, block_id))
                return
            self.free[block_id] = None
            if reuse_first and block.hash is None:
                self.free.move_to_end(block_id, last=False)

    def register(self, block_id: int, h: BlockHash, key: BlockKey) -> bool:
        """Make a full block findable by its hash; the first block with given contents stays canonical. Returns
        whether the hash is new to the pool."""
        block = self.blocks[block_id]
        if block.hash is not None or h in self.cached:
            return False
        block.hash, block.key = h, key
        self.cached[h] = block_id
        return True

    def clear_cache(self) -> int:
        """Forget every hash (blocks in use keep their KV, but no later request finds them); returns how many."""
        for block_id in self.cached.values():
            self.blocks[block_id].hash = self.blocks[block_id].key = None
        n = len(self.cached)
        self.cached.clear()
        for block_id in self.pinned:  # nothing left to keep them for
            self.free[block_id] = None
        self.pinned.clear()
        self._deadlines.clear()
        return n

    def check_integrity(self) -> None:
        assert not set(self.free) & set(self.pinned), "a block is both free and pinned"
        assert all(self.blocks[b].hash is not None for b in self.pinned), "a pinned block holds no cached KV"
        free_ids = set(self.free) | set(self.pinned)
        assert len(set(self.free)) == len(self.free), "duplicate ids in the free queue"
        assert NULL_BLOCK not in free_ids, "null block is in the free queue"
        for block in self.blocks[1:]:
            in_free = block.block_id in free_ids
            assert block.ref_count >= 0, f"negative ref_count on block {block.block_id}"
            assert in_free == (block.ref_count == 0), f"block {block.block_id}: ref {block.ref_count}, free {in_free}"
            if block.hash is not None:
                assert self.cached.get(block.hash) == block.block_id, f"block {block.block_id} hash not indexed"
        for h, block_id in self.cached.items():
            assert self.blocks[block_id].hash == h, f"hash map points at block {block_id} with another hash"
