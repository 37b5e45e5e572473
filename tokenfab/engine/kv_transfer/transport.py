"""KV transports between replicas: a prefill replica's `KVServer`, a decode replica's `KVPuller`.

The decode side pulls (vLLM's NIXL connector has the same shape). It asks the prefill replica's server to
`describe` a held export (the stable hash of each of the prompt's full blocks, which of them each window group
holds), pulls the blocks it lacks, and `release`s the export so the prefill replica frees them. Two transports:

- **shm** (one host): the prefill replica's KV cache lives in memory-mapped files (`SharedSegments`); `describe`
  also gives the export's block ids, and the decode replica copies those blocks straight out of the mapped memory
  (one copy, like an RDMA read). The export is kept at least `READ_GRACE_S` past the describe, so it cannot be
  freed under the read.
- **tcp** (any hosts): `read` asks for blocks; the server copies them out of its cache (the export held open
  meanwhile) and sends them as ZeroMQ frames, one per block.
- **nixl** (any hosts, where NVIDIA's NIXL installs: the `nixl` extra): both sides register their KV memory with a
  NIXL agent (UCX; host memory needs no GPU); `describe` also gives the prefill replica's agent metadata and cache
  addresses, and the decode replica READs the blocks' rows into a registered staging buffer, as vLLM's
  NixlConnector does. Kept `READ_GRACE_S` past the describe, like shm.

Every request has a timeout; a peer that does not answer costs the decode replica at most that, after which it
computes the prompt itself (the caller's fallback).
"""

from __future__ import annotations

import importlib
import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import torch
import zmq

from tokenfab.attention.backend import KVCache
from tokenfab.engine.block_hash import BlockHash
from tokenfab.engine.kv_transfer.exports import ExportTable
from tokenfab.engine.types import KVTransferParams

log = logging.getLogger("tokenfab.engine")

TRANSPORTS = ("shm", "tcp", "nixl")
READ_GRACE_S = 30.0
"""How long an export is kept past a shm describe, whatever else happens: the decode replica reads it directly."""
POLL_MS = 100
MAX_MAPPED = 64
"""Prefill replicas whose memory a decode replica keeps mapped."""

_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


SHM_DIR = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
"""Where the shm transport's KV files live (memory-backed on Linux)."""


class SharedSegments:
    """Allocates a KV cache's tensors in memory-mapped files under SHM_DIR, so a peer on this host can map and read
    them. The files are removed at `close`; those of a process that died without closing are removed by the next
    one that starts (their names carry the pid)."""

    def __init__(self) -> None:
        _remove_orphans()
        self.prefix = f"tfkv-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.paths: list[Path] = []

    def tensor(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        if device.type != "cpu":
            raise ValueError("the shm KV transport needs the KV cache in host memory (--kv-transport tcp otherwise)")
        path = SHM_DIR / f"{self.prefix}-{len(self.paths)}"
        count = max(1, torch.Size(shape).numel())
        nbytes = count * torch.tensor([], dtype=dtype).element_size()
        free = shutil.disk_usage(SHM_DIR).free
        if nbytes > free:  # a sparse file past the space left would fault on first write, not here
            raise ValueError(
                f"the shm KV transport needs {nbytes / 2**30:.2f} GiB in {SHM_DIR}, which has {free / 2**30:.2f} GiB "
                "free: enlarge it, lower --kv-cache-memory-gb, or use --kv-transport tcp"
            )
        self.paths.append(path)
        return torch.from_file(str(path), shared=True, size=count, dtype=dtype)[: torch.Size(shape).numel()].view(shape)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.paths]

    def close(self) -> None:
        for path in self.paths:
            path.unlink(missing_ok=True)


def _remove_orphans() -> None:
    """KV files of processes that are gone."""
    for path in SHM_DIR.glob("tfkv-*"):
        pid = path.name.split("-")[1]
        if pid.isdigit() and not _alive(int(pid)):
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _map(name: str, spec: dict[str, Any]) -> torch.Tensor:
    """A peer's KV tensor, mapped from its file (never created here: a missing file raises FileNotFoundError)."""
    path = SHM_DIR / name
    if "/" in name or not name.startswith("tfkv-"):
        raise ValueError(f"not a KV file name: {name!r}")
    dtype = getattr(torch, spec["dtype"])
    count = torch.Size(spec["shape"]).numel()
    if path.stat().st_size < count * torch.tensor([], dtype=dtype).element_size():
        raise ValueError(f"{name} is smaller than its layout")
    return torch.from_file(str(path), shared=True, size=count, dtype=dtype).view(spec["shape"])


def nixl_api() -> Any:
    """NIXL's Python API (`nixl`, or the `nixl_cu12`/`nixl_cu13` build its wheels install), or None."""
    for name in ("nixl", "nixl_cu12", "nixl_cu13"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "nixl_agent"):
            return module
    return None


def _nixl_agent(name: str) -> Any:
    api = nixl_api()
    if api is None:
        raise ValueError("the nixl KV transport needs NIXL: pip install 'tokenfab[nixl]' (or use shm or tcp)")
    return api.nixl_agent(name, api.nixl_agent_config(backends=["UCX"]))


def _cache_tensors(cache: KVCache) -> list[torch.Tensor]:
    """The cache's tensors in the order K0, V0, K1, V1, ..."""
    return [t for k, v in zip(cache.k, cache.v) for t in (k, v)]


def _layout(cache: KVCache) -> list[dict[str, Any]]:
    """Shape and dtype of each cache tensor, in the order K0, V0, K1, V1, ... (what a mapping peer needs)."""
    return [
        {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for k, v in zip(cache.k, cache.v)
        for t in (k, v)
    ]


def _block(cache_k: torch.Tensor, cache_v: torch.Tensor, block_id: int, block_size: int) -> torch.Tensor:
    """A copy of one block's K and V: [2, layers, block_size, kv_heads, head_dim]."""
    rows = slice(block_id * block_size, (block_id + 1) * block_size)
    return torch.stack([cache_k[:, rows], cache_v[:, rows]])


class KVServer:
    """Serves a replica's held exports to the decode replicas that pull them (a ROUTER socket on a thread)."""

    def __init__(
        self,
        exports: ExportTable,
        cache: KVCache,
        transport: str,
        host: str = "127.0.0.1",
        segments: SharedSegments | None = None,
    ) -> None:
        if transport not in TRANSPORTS:
            raise ValueError(f"unknown KV transport {transport!r}; choose {', '.join(TRANSPORTS)}")
        if transport == "shm" and segments is None:
            raise ValueError("the shm KV transport needs the cache allocated in SharedSegments")
        self.exports, self.cache, self.transport, self.segments = exports, cache, transport, segments
        self.engine_id = uuid.uuid4().hex[:12]
        self._agent: Any = None
        if transport == "nixl":
            self._agent = _nixl_agent(f"tokenfab-{self.engine_id}")
            self._agent.register_memory(_cache_tensors(cache))
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        if transport == "shm":
            self._socket.bind(f"ipc:///tmp/tokenfab-kv-{os.getpid()}-{self.engine_id}")
        else:
            self._socket.bind(f"tcp://{host}:*")
        self.endpoint = self._socket.getsockopt_string(zmq.LAST_ENDPOINT)
        if host == "0.0.0.0":  # every interface: peers reach it at this host's address
            port = self.endpoint.rsplit(":", 1)[1]
            self.endpoint = f"tcp://{socket.gethostbyname(socket.gethostname())}:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kv-transfer-server", daemon=True)
        self._thread.start()

    def params(self, transfer_id: str, num_blocks: int) -> KVTransferParams:
        """What a decode replica needs to pull an export of this server."""
        return KVTransferParams(
            do_remote_prefill=True,
            remote_engine_id=self.engine_id,
            remote_endpoint=self.endpoint,
            transfer_id=transfer_id,
            transport=self.transport,
            remote_blocks=num_blocks,
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            if not self._socket.poll(POLL_MS):
                continue
            ident, _, payload = self._socket.recv_multipart()
            try:
                frames = self._handle(_decode(payload))
            except Exception as e:  # noqa: BLE001 - a bad request gets an answer, the server goes on
                log.warning("KV server: %s", e)
                frames = [_encode({"ok": False, "error": str(e)})]
            self._socket.send_multipart([ident, b"", *frames])

    def _handle(self, message: dict[str, Any]) -> list[Any]:
        op, transfer_id = message["op"], message["id"]
        if op == "release":
            return [_encode({"ok": self.exports.release(transfer_id)})]
        grace = READ_GRACE_S if op == "describe" and self.transport in ("shm", "nixl") else 0.0
        with self.exports.reading(transfer_id, grace) as export:
            if export is None:
                return [_encode({"ok": False, "error": f"no export {transfer_id!r}"})]
            if op == "describe":
                reply: dict[str, Any] = {
                    "ok": True,
                    "hashes": export.hashes,
                    "tables": [t[: len(export.hashes)] for t in export.tables],
                    "block_size": self.cache.block_size,
                }
                if self.segments is not None:
                    reply["segments"], reply["layout"] = self.segments.names, _layout(self.cache)
                if self._agent is not None:
                    reply["nixl"] = {
                        "agent": f"tokenfab-{self.engine_id}",
                        "metadata": self._agent.get_agent_metadata(),
                        "addrs": [t.data_ptr() for t in _cache_tensors(self.cache)],
                    }
                    reply["layout"] = _layout(self.cache)
                return [_encode(reply)]
            if op == "read":
                blocks = [torch.stack(self.cache.block(g, export.tables[g][i])) for g, i in message["blocks"]]
                sizes = [b.numel() * b.element_size() for b in blocks]
                self.exports.stats.sent_bytes += sum(sizes)
                return [_encode({"ok": True}), *(b.view(torch.uint8).numpy() for b in blocks)]
        raise ValueError(f"unknown op {op!r}")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2.0)
        self._socket.close(linger=0)
        self._ctx.term()


@dataclass(slots=True)
class Remote:
    """What a prefill replica holds of one export."""

    hashes: list[BlockHash]
    tables: list[list[int]]
    segments: list[str] | None
    layout: list[dict[str, Any]] | None
    nixl: dict[str, Any] | None = None
    """Its NIXL agent's name and metadata, and the addresses of its cache tensors."""


class KVPuller:
    """A decode replica's side: describe, pull and release exports of prefill replicas (from the engine thread)."""

    def __init__(self, cache: KVCache, timeout_s: float = 5.0) -> None:
        self.cache = cache
        self.timeout_s = timeout_s
        self._ctx = zmq.Context()
        self._sockets: dict[str, zmq.Socket] = {}
        self._mapped: dict[str, list[torch.Tensor]] = {}
        self._agent: Any = None
        self._peers: set[str] = set()
        self._staging: torch.Tensor | None = None
        self._staging_reg: Any = None

    def describe(self, params: KVTransferParams) -> Remote | None:
        reply = self._ask(params, {"op": "describe", "id": params.transfer_id})
        if reply is None:
            return None
        head = _decode(reply[0])
        if not head.get("ok"):
            log.warning("KV pull %s: %s", params.transfer_id, head.get("error"))
            return None
        if head["block_size"] != self.cache.block_size:
            log.warning(
                "KV pull %s: block size %d here, %d there",
                params.transfer_id,
                self.cache.block_size,
                head["block_size"],
            )
            return None
        return Remote(head["hashes"], head["tables"], head.get("segments"), head.get("layout"), head.get("nixl"))

    def fetch(
        self, params: KVTransferParams, remote: Remote, wanted: list[tuple[int, int]]
    ) -> list[torch.Tensor] | None:
        """The blocks (group, index) of an export, in that order ([2, layers, block_size, kv_heads, head_dim]
        each), or None when any could not be had."""
        if params.transport == "nixl":
            return self._nixl_read(params, remote, wanted)
        if params.transport == "shm":
            tensors = self._map(params, remote)
            if tensors is None:
                return None
            bs = self.cache.block_size
            return [_block(tensors[2 * g], tensors[2 * g + 1], remote.tables[g][i], bs) for g, i in wanted]
        reply = self._ask(params, {"op": "read", "id": params.transfer_id, "blocks": [list(w) for w in wanted]})
        if reply is None or not _decode(reply[0]).get("ok") or len(reply) != len(wanted) + 1:
            return None
        out = []
        for (g, _), frame in zip(wanted, reply[1:]):
            k = self.cache.k[g]
            shape = (2, k.shape[0], self.cache.block_size, k.shape[2], k.shape[3])
            data = torch.frombuffer(bytearray(frame), dtype=torch.uint8)
            if data.numel() != torch.Size(shape).numel() * k.element_size():
                return None
            out.append(data.view(k.dtype).view(shape))
        return out

    def release(self, params: KVTransferParams) -> None:
        self._ask(params, {"op": "release", "id": params.transfer_id})

    def _nixl_read(
        self, params: KVTransferParams, remote: Remote, wanted: list[tuple[int, int]]
    ) -> list[torch.Tensor] | None:
        """READ the wanted blocks from the prefill replica's registered cache into the staging buffer, laid out per
        group as [K/V, layer, the group's wanted blocks' rows, heads, dim], so that a run of blocks with consecutive
        ids there is one descriptor per layer and K/V. The blocks returned view the buffer ([2, layers, block_size,
        heads, dim] each; written into the pool before the next pull)."""
        info = remote.nixl
        if info is None or remote.layout is None or len(info["addrs"]) != 2 * len(self.cache.k):
            return None
        if self._agent is None:
            self._agent = _nixl_agent(f"tokenfab-pull-{uuid.uuid4().hex[:12]}")
        if info["agent"] not in self._peers:
            self._peers.add(self._agent.add_remote_agent(info["metadata"]))
        bs = self.cache.block_size
        by_group: dict[int, list[int]] = {}
        for g, i in wanted:
            by_group.setdefault(g, []).append(i)
        for g in by_group:
            k, spec = self.cache.k[g], remote.layout[2 * g]
            if spec["shape"][0] != k.shape[0] or spec["shape"][2:] != list(k.shape[2:]):
                return None
        row = {
            g: self.cache.k[g].shape[2] * self.cache.k[g].shape[3] * self.cache.k[g].element_size() for g in by_group
        }
        sizes = {g: 2 * self.cache.k[g].shape[0] * len(idx) * bs * row[g] for g, idx in by_group.items()}
        staging = self._staging_for(sum(sizes.values()))
        remote_descs, local_descs, views, at = [], [], {}, 0
        for g, indices in by_group.items():
            k, n, rows_total = self.cache.k[g], len(indices), remote.layout[2 * g]["shape"][1]
            blocks = [remote.tables[g][i] for i in indices]
            runs, j = [], 0  # (first position, its block id, length) of each run of consecutive block ids
            while j < n:
                length = 1
                while j + length < n and blocks[j + length] == blocks[j] + length:
                    length += 1
                runs.append((j, blocks[j], length))
                j += length
            for which in (0, 1):
                base = info["addrs"][2 * g + which]
                for layer in range(k.shape[0]):
                    region = staging.data_ptr() + at + (which * k.shape[0] + layer) * n * bs * row[g]
                    for first, block, length in runs:
                        nbytes = length * bs * row[g]
                        remote_descs.append((base + (layer * rows_total + block * bs) * row[g], nbytes, 0))
                        local_descs.append((region + first * bs * row[g], nbytes, 0))
            grid = staging[at : at + sizes[g]].view(k.dtype).view(2, k.shape[0], n * bs, k.shape[2], k.shape[3])
            for j, i in enumerate(indices):
                views[(g, i)] = grid[:, :, j * bs : (j + 1) * bs]
            at += sizes[g]
        agent = self._agent
        handle = agent.initialize_xfer(
            "READ", agent.get_xfer_descs(local_descs, "DRAM"), agent.get_xfer_descs(remote_descs, "DRAM"), info["agent"]
        )
        try:
            state = agent.transfer(handle)
            deadline = time.monotonic() + self.timeout_s
            while state == "PROC" and time.monotonic() < deadline:
                state = agent.check_xfer_state(handle)
        finally:
            agent.release_xfer_handle(handle)
        if state != "DONE":
            log.warning("KV pull %s: NIXL read %s", params.transfer_id, state)
            return None
        return [views[w] for w in wanted]

    def _staging_for(self, nbytes: int) -> torch.Tensor:
        """A registered host buffer of at least `nbytes` (grown, and registered again, when too small)."""
        if self._staging is None or self._staging.numel() < nbytes:
            if self._staging is not None:
                self._agent.deregister_memory(self._staging_reg)
            self._staging = torch.empty(max(nbytes, 1 << 20), dtype=torch.uint8)
            self._staging_reg = self._agent.register_memory([self._staging])
        return self._staging

    def _map(self, params: KVTransferParams, remote: Remote) -> list[torch.Tensor] | None:
        """The prefill replica's cache tensors, mapped from its shared memory (once per replica)."""
        engine = params.remote_engine_id or ""
        if engine in self._mapped:
            return self._mapped[engine]
        if remote.segments is None or remote.layout is None or len(remote.layout) != 2 * len(self.cache.k):
            return None
        try:
            tensors = [_map(name, spec) for name, spec in zip(remote.segments, remote.layout)]
        except (OSError, ValueError, AttributeError) as e:
            log.warning("KV pull %s: cannot map the prefill replica's memory: %s", params.transfer_id, e)
            return None
        for t, own in zip(tensors, [t for pair in zip(self.cache.k, self.cache.v) for t in pair]):
            if t.dtype != own.dtype or t.shape[0] != own.shape[0] or t.shape[2:] != own.shape[2:]:
                return None
        self._mapped[engine] = tensors
        while len(self._mapped) > MAX_MAPPED:  # the oldest peer's mapping goes first
            del self._mapped[next(iter(self._mapped))]
        return tensors

    def _ask(self, params: KVTransferParams, message: dict[str, Any]) -> list[Any] | None:
        """One request/reply with the prefill replica's server; None on timeout (the socket is then rebuilt)."""
        endpoint = params.remote_endpoint
        if endpoint is None:
            return None
        sock = self._sockets.get(endpoint)
        if sock is None:
            sock = self._sockets[endpoint] = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(endpoint)
        sock.send_multipart([b"", _encode(message)])
        deadline = time.monotonic() + self.timeout_s
        while (left := deadline - time.monotonic()) > 0:
            if sock.poll(int(left * 1000) + 1):
                frames = sock.recv_multipart(copy=False)
                return [f.bytes if i == 0 else f.buffer for i, f in enumerate(frames[1:])]
        log.warning(
            "KV pull %s: %s did not answer %s within %.1f s",
            params.transfer_id,
            endpoint,
            message["op"],
            self.timeout_s,
        )
        sock.close(linger=0)
        del self._sockets[endpoint]
        self._forget(params.remote_engine_id)
        return None

    def _forget(self, engine: str | None) -> None:
        self._mapped.pop(engine or "", None)

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._ctx.term()
