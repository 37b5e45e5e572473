"""KvIndex: which replica holds which KV block, built only from the replicas' own KV events.

One `KVEventSubscriber` per replica follows its publisher in sequence order (a gap is fetched from the replay
socket); `refresh` applies whatever has arrived. A block counts for routing when a full-attention group holds it
(a sliding-window group keeps only a prompt's last window, which cannot serve a prefix on its own). Hashes are the
64-bit form the events carry, so the router hashes a prompt exactly as the replicas do (`block_hash`).
"""

from __future__ import annotations

import logging
import time

from tokenfab.engine.block_hash import block_hashes, external_hash
from tokenfab.engine.kv_events import BlockStored, KVEventSubscriber

log = logging.getLogger("tokenfab.cluster")


def prompt_blocks(token_ids: list[int], block_size: int) -> list[int]:
    """The 64-bit hashes of a prompt's full blocks, as a replica's KV events name them."""
    return [external_hash(h) for h in block_hashes(token_ids, block_size)]


class KvIndex:
    def __init__(self) -> None:
        self._subscribers: dict[int, KVEventSubscriber] = {}
        self._full: set[int | None] = set()
        """Group indices the events describe as full-attention groups."""
        self.resyncs = 0
        """Times a replica's batches were lost beyond its replay buffer (its blocks were then read again)."""
        self.lag: dict[int, float] = {}
        """Per replica: seconds between its last applied batch's publication and when the index applied it."""
        self._replayed_before = 0
        """Batches recovered by replay from subscribers since forgotten."""

    def follow(self, replica: int, endpoint: str, replay_endpoint: str | None, topic: str = "kv-events") -> None:
        """Index the replica from its publisher's events (a restarted replica starts again from nothing)."""
        self.forget(replica)
        self._subscribers[replica] = KVEventSubscriber(endpoint, replay_endpoint, topic)

    @property
    def replayed(self) -> int:
        """Batches that were missed live and fetched from a replica's replay socket."""
        return self._replayed_before + sum(s.replayed for s in self._subscribers.values())

    def forget(self, replica: int) -> None:
        """The replica is gone: none of its blocks count any more."""
        subscriber = self._subscribers.pop(replica, None)
        self.lag.pop(replica, None)
        if subscriber is not None:
            self._replayed_before += subscriber.replayed
            subscriber.close()

    def refresh(self) -> None:
        """Apply every batch that has arrived (gaps replayed; a gap the replay buffer no longer holds resyncs)."""
        for replica, subscriber in self._subscribers.items():
            try:
                batches = subscriber.batches(0)
            except (RuntimeError, TimeoutError) as e:
                log.warning("replica %d: KV events lost (%s); resyncing from its replay buffer", replica, e)
                subscriber.forget_blocks()
                subscriber.last_seq = -1
                self.resyncs += 1
                batches = subscriber.batches(0, catch_up=True)
            if batches:
                self.lag[replica] = max(time.time() - batches[-1][1].ts, 0.0)
            for _, batch in batches:
                for event in batch.events:
                    if isinstance(event, BlockStored) and event.kv_cache_spec_kind != "sliding_window":
                        self._full.add(event.group_idx)

    def blocks(self, replica: int) -> set[int]:
        """Hashes of the blocks a replica can serve a prefix from."""
        subscriber = self._subscribers.get(replica)
        return {h for g, h in subscriber.blocks if g in self._full} if subscriber is not None else set()

    def overlap(self, replica: int, hashes: list[int]) -> int:
        """How many of the prompt's leading blocks the replica holds."""
        subscriber = self._subscribers.get(replica)
        if subscriber is None:
            return 0
        held, n = subscriber.blocks, 0
        for h in hashes:
            if not any((g, h) in held for g in self._full):
                break
            n += 1
        return n

    def size(self) -> int:
        return sum(len(s.blocks) for s in self._subscribers.values())

    def close(self) -> None:
        for subscriber in self._subscribers.values():
            subscriber.close()
