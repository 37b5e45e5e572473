"""ExportTable: the KV blocks of finished prefill legs, held for the decode replicas that will pull them.

A prefill leg (`KVTransferParams.do_remote_decode`) does not give its blocks back when it finishes: the KV cache
manager hands its block tables here, still referenced, so nothing can reuse them while a decode replica reads
them. They are freed when that replica says it is done (`release`), or when nobody did within the timeout (the
decode replica died, or never got the request): no block is stranded for longer than that.

The engine's thread adds and frees; the KV server's thread reads blocks and records releases. A read holds the
export open (`reading`), and an export being read is never freed under it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from tokenfab.engine.block_hash import BlockHash
from tokenfab.engine.stats import TransferStats


@dataclass(slots=True)
class Export:
    tables: list[list[int]]
    """Block ids per window group (the null block where a sliding group dropped one)."""
    hashes: list[BlockHash]
    """Of the prompt's full blocks, in order."""
    deadline: float
    """time.monotonic() after which it is freed unreleased."""
    readers: int = 0
    released: bool = False


class ExportTable:
    def __init__(self, timeout_s: float, transport: str) -> None:
        self.timeout_s = timeout_s
        self.stats = TransferStats(transport=transport)
        self._lock = threading.Lock()
        self._held: dict[str, Export] = {}

    def hold(self, transfer_id: str, tables: list[list[int]], hashes: list[BlockHash]) -> None:
        """Keep a finished prefill's blocks (their references move here) until released or timed out."""
        with self._lock:
            self._held[transfer_id] = Export(tables, hashes, time.monotonic() + self.timeout_s)
        self.stats.exported += 1

    @contextmanager
    def reading(self, transfer_id: str, grace_s: float = 0.0) -> Iterator[Export | None]:
        """The export, held open for the `with` block (None: unknown, released or freed); `grace_s` keeps it at
        least that long past now (a peer reading the memory directly after this returns)."""
        with self._lock:
            export = self._held.get(transfer_id)
            if export is not None and export.released:
                export = None
            if export is not None:
                export.readers += 1
                export.deadline = max(export.deadline, time.monotonic() + grace_s)
        try:
            yield export
        finally:
            if export is not None:
                with self._lock:
                    export.readers -= 1

    def release(self, transfer_id: str) -> bool:
        """The decode replica has what it needs: free the blocks (on the engine's next `settle`)."""
        with self._lock:
            export = self._held.get(transfer_id)
            if export is None or export.released:
                return False
            export.released = True
            return True

    def settle(self, now: float | None = None) -> list[Export]:
        """Exports to free now: released, or past their deadline, and not being read."""
        now = time.monotonic() if now is None else now
        done: list[Export] = []
        with self._lock:
            for transfer_id, export in list(self._held.items()):
                if export.readers == 0 and (export.released or export.deadline <= now):
                    del self._held[transfer_id]
                    done.append(export)
        for export in done:
            if export.released:
                self.stats.exports_released += 1
            else:
                self.stats.exports_expired += 1
        return done

    def drop_all(self) -> list[Export]:
        """Every export, to be freed now (the prefix cache was reset, or the engine stops)."""
        with self._lock:
            done, self._held = list(self._held.values()), {}
        return done

    def held(self) -> list[Export]:
        """The exports held now."""
        with self._lock:
            return list(self._held.values())

    def snapshot(self) -> TransferStats:
        with self._lock:
            held = len(self._held)
        self.stats.exports_held = held
        return TransferStats(**{f: getattr(self.stats, f) for f in TransferStats.__struct_fields__})
