"""DiskTier: one file per block under a directory of this model's namespace, so blocks outlive the server.

A file is `MAGIC`, a 16-byte BLAKE2b digest of the rest, the header length, a msgpack header (group, parent hash,
tokens, dtype, shape) and the raw KV bytes. Files are written by a background thread, to a temporary name first and
renamed, so a reader never sees half a block; a file that fails its digest, its header or its length is deleted and
reported as a miss (the block is recomputed, never served). The index of what is on disk lives in memory (rebuilt
from the file names at start, oldest first by modification time) and bounds the tier by bytes, dropping the least
recently used files. A write that fails (disk full, permissions) stops the tier from taking more; it keeps serving
what it holds and the engine keeps running.
"""

from __future__ import annotations

import hashlib
import logging
import os
import queue
import struct
import threading
from collections import OrderedDict
from pathlib import Path

import msgspec
import torch

from tokenfab.engine.block_hash import BlockHash
from tokenfab.engine.block_pool import BlockKey
from tokenfab.engine.kv_tiers.store import Evicted, TierStore

log = logging.getLogger("tokenfab.engine")

MEDIUM_DISK = "DISK"
MAGIC = b"TFKVBLK1"
_HEAD = struct.Struct("<16sI")
_DTYPES = {str(d): d for d in (torch.float32, torch.bfloat16, torch.float16)}


class _Header(msgspec.Struct, array_like=True):
    group: int
    parent: bytes | None
    tokens: list[int]
    dtype: str
    shape: list[int]


class DiskTier(TierStore):
    medium = MEDIUM_DISK

    def __init__(self, root: str | Path, namespace: str, capacity_bytes: int, max_pending: int = 256) -> None:
        self.dir = Path(root) / namespace
        self.dir.mkdir(parents=True, exist_ok=True)
        self._capacity = capacity_bytes
        self._index: OrderedDict[tuple[int, BlockHash], int] = OrderedDict()
        """(group, hash) -> file size, least recently used first."""
        self._pending: dict[tuple[int, BlockHash], bytes] = {}
        """Blocks queued for writing: served from memory until they are on disk."""
        self._lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, tuple[int, BlockHash], bytes | None] | None] = queue.Queue(max_pending)
        self._used = 0
        self.accepting = True
        """False once a write failed: the tier then only serves what it holds."""
        self.corrupt = 0
        """Files that failed their checks (deleted, recomputed)."""
        self.write_errors = 0
        self.dropped_writes = 0
        """Blocks not written because the writer was behind."""
        self._failed: list[tuple[int, BlockHash]] = []
        self._scan()
        self._writer = threading.Thread(target=self._write_loop, name="tokenfab-kv-disk", daemon=True)
        self._writer.start()

    # -- index ---------------------------------------------------------------------------------------------------

    def path(self, group: int, h: BlockHash) -> Path:
        """Where a block's file is (or would be)."""
        name = h.hex()
        return self.dir / name[:2] / f"{group}-{name}.kv"

    def _scan(self) -> None:
        """Rebuild the index from the files a previous run left (their contents are checked when loaded)."""
        found = []
        for path in self.dir.glob("*/*"):
            if path.suffix != ".kv":
                path.unlink(missing_ok=True)  # a write cut short by a crash
                continue
            group, _, name = path.stem.partition("-")
            try:
                key = (int(group), bytes.fromhex(name))
                stat = path.stat()
            except (ValueError, OSError):
                continue
            found.append((stat.st_mtime, key, stat.st_size))
        for _, key, size in sorted(found):
            self._index[key] = size
            self._used += size
        self._shrink(None)

    def _shrink(self, evicted: Evicted | None, incoming: int = 0) -> None:
        while self._index and self._used + incoming > self._capacity:
            key, size = self._index.popitem(last=False)
            self._used -= size
            with self._lock:
                self._pending.pop(key, None)
            self._enqueue(("delete", key, None), block=True)
            if evicted is not None:
                evicted(key[0], key[1], None, None)

    # -- TierStore -----------------------------------------------------------------------------------------------

    def has(self, group: int, h: BlockHash) -> bool:
        self._reap()
        return (group, h) in self._index

    def put(self, group: int, h: BlockHash, key: BlockKey, k: torch.Tensor, v: torch.Tensor, evicted: Evicted) -> bool:
        self._reap()
        name = (group, h)
        if name in self._index:
            self._index.move_to_end(name)
            return False
        if not self.accepting:
            return False
        data = encode(group, key, k, v)
        if len(data) > self._capacity:
            return False
        self._shrink(evicted, len(data))
        with self._lock:
            self._pending[name] = data
        if not self._enqueue(("write", name, data)):
            with self._lock:
                del self._pending[name]
            self.dropped_writes += 1
            return False
        self._index[name] = len(data)
        self._used += len(data)
        return True

    def get(self, group: int, h: BlockHash, key: BlockKey) -> torch.Tensor | None:
        self._reap()
        k = (group, h)
        if k not in self._index:
            return None
        with self._lock:
            data = self._pending.get(k)
        if data is None:
            try:
                data = self.path(group, h).read_bytes()
            except OSError:
                data = b""
        decoded = decode(data, group, key)
        if decoded is None:
            if data and _header_key(data) not in (None, key):
                return None  # another block's tokens under this hash: keep the file, miss
            self.corrupt += 1
            log.warning("KV disk tier: block %s of group %d failed its checks; dropped", h.hex()[:16], group)
            self.discard(group, h)
            return None
        self._index.move_to_end(k)
        return decoded

    def discard(self, group: int, h: BlockHash) -> bool:
        k = (group, h)
        size = self._index.pop(k, None)
        if size is None:
            return False
        self._used -= size
        with self._lock:
            self._pending.pop(k, None)
        self._enqueue(("delete", k, None), block=True)
        return True

    def held(self) -> list[tuple[int, BlockHash]]:
        return list(self._index)

    def clear(self) -> list[tuple[int, BlockHash]]:
        held = self.held()
        for group, h in held:
            self.discard(group, h)
        return held

    @property
    def num_blocks(self) -> int:
        return len(self._index)

    @property
    def used_bytes(self) -> int:
        return self._used

    @property
    def capacity_bytes(self) -> int:
        return self._capacity

    def take_failed(self) -> list[tuple[int, BlockHash]]:
        """Blocks whose write failed since the last call (no longer held)."""
        self._reap()
        failed, self._failed = self._failed, []
        return failed

    def close(self) -> None:
        """Write what is queued, then stop the writer."""
        self._queue.put(None)
        self._writer.join(timeout=60)

    # -- the writer thread ---------------------------------------------------------------------------------------

    def _enqueue(self, item: tuple[str, tuple[int, BlockHash], bytes | None], block: bool = False) -> bool:
        try:
            self._queue.put(item, block=block, timeout=10 if block else None)
            return True
        except queue.Full:
            return False

    def _write_loop(self) -> None:
        while (item := self._queue.get()) is not None:
            op, k, data = item
            path = self.path(*k)
            tmp: Path | None = None
            try:
                if op == "delete":
                    path.unlink(missing_ok=True)
                    continue
                assert data is not None
                path.parent.mkdir(exist_ok=True)
                tmp = path.with_suffix(f".tmp{threading.get_ident()}")
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            except OSError as e:
                if tmp is not None:
                    tmp.unlink(missing_ok=True)
                with self._lock:
                    self._failed.append(k)
                    self._pending.pop(k, None)
                if self.accepting:
                    log.warning("KV disk tier: write failed (%s); the tier takes no more blocks", e)
                self.accepting = False
                self.write_errors += 1
            else:
                if op == "write":
                    with self._lock:
                        if self._pending.get(k) is data:
                            del self._pending[k]

    def _reap(self) -> None:
        """Forget blocks whose write failed (called on the engine's thread, which owns the index)."""
        if not self._failed or not self._lock.acquire(blocking=False):
            return
        try:
            failed = [k for k in self._failed if k in self._index]
        finally:
            self._lock.release()
        for k in failed:
            self._used -= self._index.pop(k)


def encode(group: int, key: BlockKey, k: torch.Tensor, v: torch.Tensor) -> bytes:
    parent, tokens = key
    shape = [2, *k.shape]
    header = msgspec.msgpack.encode(_Header(group, parent, list(tokens), str(k.dtype), shape))
    payload = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in (k, v))
    body = struct.pack("<I", len(header)) + header + payload
    return MAGIC + hashlib.blake2b(body, digest_size=16).digest() + body


def decode(data: bytes, group: int, key: BlockKey) -> torch.Tensor | None:
    """The block's KV if `data` is a whole, uncorrupted file of exactly this block; else None."""
    start = len(MAGIC) + 16
    if len(data) < start + 4 or not data.startswith(MAGIC):
        return None
    body = memoryview(data)[start:]
    if hashlib.blake2b(body, digest_size=16).digest() != data[len(MAGIC) : start]:
        return None
    header = _parse_header(data)
    if header is None or header.group != group or (header.parent, tuple(header.tokens)) != key:
        return None
    dtype = _DTYPES.get(header.dtype)
    (hlen,) = struct.unpack_from("<I", data, start)
    payload = body[4 + hlen :]
    if dtype is None or len(payload) != dtype.itemsize * _numel(header.shape):
        return None
    return torch.frombuffer(bytearray(payload), dtype=torch.uint8).view(dtype).reshape(header.shape)


def _parse_header(data: bytes) -> _Header | None:
    start = len(MAGIC) + 16
    try:
        (hlen,) = struct.unpack_from("<I", data, start)
        return msgspec.msgpack.decode(data[start + 4 : start + 4 + hlen], type=_Header)
    except (struct.error, msgspec.DecodeError):
        return None


def _header_key(data: bytes) -> BlockKey | None:
    header = _parse_header(data)
    return None if header is None else (header.parent, tuple(header.tokens))


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
