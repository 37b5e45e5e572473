"""KV cache events: which blocks a replica holds, published so a router or indexer can track it.

Per step the KV cache manager records `BlockStored` (a run of blocks that became full and findable, with the
parent of the first and their tokens), `BlockRemoved` (cached blocks evicted for reuse) and `AllBlocksCleared`
(the prefix cache was reset); the engine publishes them as one `EventBatch`. Each event says which window group
it belongs to (a sliding-window group holds a block only while it is inside the window).

The wire format is vLLM's: ZeroMQ PUB frames `[topic, 8-byte big-endian sequence, msgpack EventBatch]`, batches
kept for replay behind a ROUTER socket (a subscriber that saw a gap sends the first sequence it missed and gets
every buffered batch from there, then `[-1, b""]`). Block hashes are the 64-bit form of the stable
`sha256_cbor` hashes (`tokenfab.engine.block_hash`), so vLLM's example subscriber, llm-d and Dynamo indexers read
them unchanged. Publishing happens on a thread of its own; with no endpoint configured nothing is recorded.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import msgspec
import zmq

logger = logging.getLogger(__name__)

MEDIUM_CPU = "CPU"
MEDIUM_GPU = "GPU"
END_SEQ = (-1).to_bytes(8, "big", signed=True)


class KVCacheEvent(msgspec.Struct, omit_defaults=True, gc=False, tag=True):
    """One change to the set of cached blocks."""


class BlockStored(KVCacheEvent):
    block_hashes: list[int]
    parent_block_hash: int | None
    """The block before the first one here; None when the first is a sequence's first block."""
    token_ids: list[int]
    """Every block's tokens, concatenated."""
    block_size: int
    lora_id: int | None
    medium: str | None
    lora_name: str | None
    extra_keys: list[Any] | None = None
    group_idx: int | None = None
    kv_cache_spec_kind: str | None = None
    """full_attention or sliding_window."""
    kv_cache_spec_sliding_window: int | None = None


class BlockRemoved(KVCacheEvent):
    block_hashes: list[int]
    medium: str | None
    group_idx: int | None = None


class AllBlocksCleared(KVCacheEvent):
    pass


def stored(
    hashes: list[int], parent: int | None, token_ids: list[int], block_size: int, medium: str | None, group: int,
    window: int | None,
) -> BlockStored:  # fmt: skip
    """A run of blocks of one window group that became findable in one medium (64-bit hashes)."""
    return BlockStored(
        block_hashes=hashes,
        parent_block_hash=parent,
        token_ids=token_ids,
        block_size=block_size,
        lora_id=None,
        medium=medium,
        lora_name=None,
        group_idx=group,
        kv_cache_spec_kind="full_attention" if window is None else "sliding_window",
        kv_cache_spec_sliding_window=window,
    )


def record_removed(events: list[KVEvent], h: int, medium: str | None, group: int) -> None:
    """Add a removed block (64-bit hash) to `events`, into the last event when that one removes blocks of the same
    group from the same medium (the pool and the tiers share one list: their removals must not merge)."""
    last = events[-1] if events else None
    if isinstance(last, BlockRemoved) and last.group_idx == group and last.medium == medium:
        last.block_hashes.append(h)
    else:
        events.append(BlockRemoved([h], medium, group))


KVEvent = BlockStored | BlockRemoved | AllBlocksCleared


class EventBatch(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    ts: float
    events: list[KVEvent]
    data_parallel_rank: int | None = None


_decoder = msgspec.msgpack.Decoder(EventBatch)


def decode_batch(payload: bytes) -> EventBatch:
    return _decoder.decode(payload)


class KVEventPublisher:
    """PUB + replay ROUTER on a background thread; `publish` only enqueues.

    `endpoint` is bound when it names a wildcard or local transport (`tcp://*:5557`, `ipc://...`) and connected
    otherwise (a collector that binds); `replay_endpoint` is always bound.
    """

    def __init__(
        self,
        endpoint: str,
        replay_endpoint: str | None = None,
        topic: str = "kv-events",
        buffer_steps: int = 10_000,
        hwm: int = 100_000,
    ) -> None:
        self.topic = topic.encode()
        self._ctx: zmq.Context = zmq.Context.instance()
        self._pub = self._ctx.socket(zmq.PUB)
        self._pub.set_hwm(hwm)
        if "*" in endpoint or endpoint.startswith(("ipc://", "inproc://")):
            self._pub.bind(endpoint)
        else:
            self._pub.connect(endpoint)
        self._replay: zmq.Socket | None = None
        if replay_endpoint is not None:
            self._replay = self._ctx.socket(zmq.ROUTER)
            self._replay.bind(replay_endpoint)
        self.endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self.replay_endpoint = self._replay.getsockopt_string(zmq.LAST_ENDPOINT) if self._replay is not None else None
        self._queue: queue.Queue[EventBatch | None] = queue.Queue()
        self._buffer: deque[tuple[int, bytes]] = deque(maxlen=buffer_steps)
        self._seq = 0
        self._encoder = msgspec.msgpack.Encoder()
        self._thread = threading.Thread(target=self._run, name="kv-event-publisher", daemon=True)
        self._thread.start()

    def publish(self, batch: EventBatch) -> None:
        self._queue.put(batch)

    def flush(self, timeout: float = 5.0) -> None:
        """Wait until every batch published so far was sent."""
        deadline = time.monotonic() + timeout
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.002)

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=5.0)
        self._pub.close(linger=0)
        if self._replay is not None:
            self._replay.close(linger=0)

    def _run(self) -> None:
        while True:
            if self._replay is not None:
                while self._replay.poll(0):
                    self._serve_replay(self._replay)
            try:
                batch = self._queue.get(timeout=0.05)
            except queue.Empty:
                continue
            try:
                if batch is None:
                    return
                payload = self._encoder.encode(batch)
                seq = self._seq.to_bytes(8, "big")
                self._pub.send_multipart((self.topic, seq, payload))
                self._buffer.append((self._seq, payload))
                self._seq += 1
            except zmq.ZMQError:
                logger.exception("publishing KV events failed")
            finally:
                self._queue.task_done()

    def _serve_replay(self, replay: zmq.Socket) -> None:
        frames = replay.recv_multipart()
        if len(frames) != 3:
            logger.warning("ignoring a malformed KV event replay request (%d frames)", len(frames))
            return
        client, _, start = frames
        first = int.from_bytes(start, "big")
        for seq, payload in self._buffer:
            if seq >= first:
                replay.send_multipart((client, b"", seq.to_bytes(8, "big"), payload))
        replay.send_multipart((client, b"", END_SEQ, b""))


class KVEventSubscriber:
    """Follows one publisher: applies every batch in sequence order, fetching gaps from the replay socket.

    `blocks` is the set of `(group_idx, block_hash)` the publisher holds in any medium (its pool or a KV tier),
    as far as the batches seen tell — what a KV-aware router indexes per replica; `media` says where each is.
    """

    def __init__(self, endpoint: str, replay_endpoint: str | None = None, topic: str = "kv-events") -> None:
        self._ctx: zmq.Context = zmq.Context.instance()
        self._sub = self._ctx.socket(zmq.SUB)
        self._sub.connect(endpoint)
        self._sub.setsockopt(zmq.SUBSCRIBE, topic.encode())
        self._replay_endpoint = replay_endpoint
        self.last_seq = -1
        self.blocks: set[tuple[int | None, int]] = set()
        self.media: dict[tuple[int | None, int], set[str | None]] = {}
        """Per block held: the media holding it (a block leaves `blocks` when the last one drops it)."""
        self.replayed = 0
        """Batches recovered through replay."""
        self._on_batch: Callable[[int, EventBatch], None] | None = None

    def batches(self, timeout_ms: int = 0, catch_up: bool = False) -> list[tuple[int, EventBatch]]:
        """Receive what is waiting (up to timeout_ms for the first message), gaps filled from the replay socket
        (catch_up: first everything the replay buffer holds); every batch is applied to `blocks` and returned with
        its sequence number, in order."""
        seen: list[tuple[int, EventBatch]] = []
        self._on_batch = lambda seq, batch: seen.append((seq, batch))
        try:
            if catch_up:
                self.catch_up()
            self.poll(timeout_ms)
        finally:
            self._on_batch = None
        return seen

    def poll(self, timeout_ms: int = 0, drop: Any = None) -> int:
        """Receive what is waiting (up to timeout_ms for the first message); returns batches applied.

        `drop(seq)`, when given, says which live messages to discard as if lost (tests of gap recovery)."""
        applied = 0
        while self._sub.poll(timeout_ms):
            timeout_ms = 0
            _, seq_bytes, payload = self._sub.recv_multipart()
            seq = int.from_bytes(seq_bytes, "big")
            if drop is not None and drop(seq):
                continue
            if seq <= self.last_seq:
                continue
            if seq > self.last_seq + 1:
                applied += self.replay(self.last_seq + 1, seq - 1)
            if seq == self.last_seq + 1:
                self._take(seq, decode_batch(payload))
                applied += 1
        return applied

    def catch_up(self) -> int:
        """Fetch every batch after the last one applied (a gap at the end shows no later message to reveal it)."""
        return self.replay(self.last_seq + 1)

    def replay(self, first: int, last: int | None = None) -> int:
        """Fetch batches first..last (None: all buffered) from the replay socket and apply them in order."""
        if self._replay_endpoint is None:
            raise RuntimeError(f"missed KV event batches {first}..{last} and no replay endpoint is configured")
        # A DEALER, not a REQ: the answer is many messages, and a REQ socket takes only one reply per request.
        dealer = self._ctx.socket(zmq.DEALER)
        dealer.connect(self._replay_endpoint)
        applied = 0
        try:
            dealer.send_multipart((b"", first.to_bytes(8, "big")))
            while True:
                if not dealer.poll(5000):
                    raise TimeoutError("the KV event replay socket did not answer")
                _, seq_bytes, payload = dealer.recv_multipart()
                if not payload:
                    break
                seq = int.from_bytes(seq_bytes, "big")
                if seq == self.last_seq + 1 and (last is None or seq <= last):
                    self._take(seq, decode_batch(payload))
                    applied += 1
        finally:
            dealer.close(linger=0)
        self.replayed += applied
        if last is not None and self.last_seq < last:
            raise RuntimeError(f"KV event batches {self.last_seq + 1}..{last} are no longer in the replay buffer")
        return applied

    def _take(self, seq: int, batch: EventBatch) -> None:
        self.apply(batch)
        self.last_seq = seq
        if self._on_batch is not None:
            self._on_batch(seq, batch)

    def apply(self, batch: EventBatch) -> None:
        media = self.media
        for event in batch.events:
            if isinstance(event, BlockStored):
                for h in event.block_hashes:
                    key = (event.group_idx, h)
                    media.setdefault(key, set()).add(event.medium)
                    self.blocks.add(key)
            elif isinstance(event, BlockRemoved):
                for h in event.block_hashes:
                    key = (event.group_idx, h)
                    held = media.get(key)
                    if held is not None:
                        held.discard(event.medium)
                        if not held:
                            del media[key]
                            self.blocks.discard(key)
            else:
                self.forget_blocks()

    def forget_blocks(self) -> None:
        """Know nothing held (before a resync from the replay buffer)."""
        self.blocks.clear()
        self.media.clear()

    def close(self) -> None:
        self._sub.close(linger=0)
