"""EngineClient: one engine core as a front end (the API server, a router) sees it.

The protocol is the same wherever the core runs: `start` (wait until its model is loaded, get its `CoreInfo`),
`add` and `abort` sequences, `results` (the stream of step diffs, each with the core's stats), `alive`/`dead`
(health) and `shutdown`. Two implementations:

- `CoreProcessClient`: a core in another process over ZeroMQ. The transport is an address spec — `ipc` (Unix
  sockets in the temp directory), `tcp` (loopback, free ports) or `tcp://HOST:PORT` (PORT and PORT+1 on HOST,
  so a core on another machine can connect: `tokenfab core --connect tcp://HOST:PORT`). The front end binds both
  sockets and the core connects, so a core can be restarted against the same addresses.
- `InProcessClient`: a core on a thread of this process (no serialization; tests, notebooks, one-process
  deployments).
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import queue
import tempfile
import threading
import time
import traceback
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from dataclasses import dataclass

import zmq
import zmq.asyncio

from tokenfab.config import EngineConfig
from tokenfab.engine.core_process import run_core, serve_core
from tokenfab.engine.ipc import (
    Abort,
    AddRequests,
    Failed,
    FromCore,
    Ready,
    Shutdown,
    StepResult,
    ToCore,
    encoder,
    from_core_decoder,
)
from tokenfab.engine.messages import CoreInfo, CoreRequest, EngineStats


class EngineDead(RuntimeError):
    """The engine core failed or is gone; requests cannot be served."""


class EngineClient(ABC):
    """One engine core. `info` is set by `start`; `stats` is the latest snapshot the core sent."""

    def __init__(self) -> None:
        self.info: CoreInfo | None = None
        self.stats: EngineStats | None = None
        self.dead: str | None = None
        """Why the core is gone, once it is."""

    @abstractmethod
    async def start(self, timeout: float = 600.0) -> CoreInfo:
        """Start (or wait for) the core until its model is loaded."""

    @abstractmethod
    async def add(self, requests: list[CoreRequest]) -> None:
        """Queue sequences; one the core refuses comes back as a finished output with `error` set."""

    @abstractmethod
    async def abort(self, request_ids: list[str]) -> None:
        """Finish these sequences and free their KV blocks; unknown ids are ignored."""

    @abstractmethod
    async def _next(self) -> FromCore:
        """The core's next message; raises EngineDead when it is gone."""

    @property
    @abstractmethod
    def alive(self) -> bool: ...

    @abstractmethod
    async def shutdown(self, timeout: float = 10.0) -> None:
        """Abort whatever is left and stop the core."""

    async def results(self) -> AsyncIterator[StepResult]:
        """Every step's outputs, in order, until the core dies (then EngineDead is raised and `dead` says why)."""
        try:
            while True:
                message = await self._next()
                if isinstance(message, Failed):
                    raise EngineDead(f"engine core failed:\n{message.message}")
                if isinstance(message, StepResult):
                    self.stats = message.stats
                    yield message
        except EngineDead as e:
            self.dead = str(e)
            raise


@dataclass(frozen=True, slots=True)
class CoreAddresses:
    """Where the front end binds its two sockets (to the core, from the core)."""

    to_core: str
    from_core: str

    @classmethod
    def parse(cls, spec: str) -> CoreAddresses:
        """`ipc`, `tcp` (loopback, free ports), `tcp://HOST:PORT` (PORT and PORT + 1) or `tcp://HOST:*`."""
        if spec == "ipc":
            base = os.path.join(tempfile.gettempdir(), f"tokenfab-{uuid.uuid4().hex[:12]}")
            return cls(f"ipc://{base}-in", f"ipc://{base}-out")
        if spec == "tcp":
            return cls("tcp://127.0.0.1:*", "tcp://127.0.0.1:*")
        if spec.startswith("tcp://"):
            host, _, port = spec.removeprefix("tcp://").rpartition(":")
            if host and port == "*":
                return cls(f"tcp://{host}:*", f"tcp://{host}:*")
            if not host or not port.isdigit() or not 0 < int(port) < 65535:
                raise ValueError(f"engine transport {spec!r}: expected tcp://HOST:PORT or tcp://HOST:*")
            return cls(f"tcp://{host}:{port}", f"tcp://{host}:{int(port) + 1}")
        raise ValueError(f"unknown engine transport {spec!r}: expected ipc, tcp or tcp://HOST:PORT")


def _connectable(bound: str) -> str:
    """The address a local process connects to for a socket bound at `bound` (wildcard hosts -> loopback)."""
    for wildcard in ("0.0.0.0", "*", "[::]"):
        bound = bound.replace(f"tcp://{wildcard}:", "tcp://127.0.0.1:")
    return bound


class CoreProcessClient(EngineClient):
    """A core in another process. spawn=False waits for one started elsewhere (`tokenfab core --connect`)."""

    def __init__(self, config: EngineConfig, transport: str = "ipc", spawn: bool = True) -> None:
        super().__init__()
        self.config = config
        self.spawn = spawn
        self._ctx = zmq.asyncio.Context()
        addresses = CoreAddresses.parse(transport)
        self._to_core = self._ctx.socket(zmq.PUSH)
        self._to_core.bind(addresses.to_core)
        self._from_core = self._ctx.socket(zmq.PULL)
        self._from_core.bind(addresses.from_core)
        self.addresses = CoreAddresses(
            self._to_core.getsockopt_string(zmq.LAST_ENDPOINT), self._from_core.getsockopt_string(zmq.LAST_ENDPOINT)
        )
        """The bound addresses (real ports where the spec asked for free ones)."""
        self._process: multiprocessing.process.BaseProcess | None = None

    async def start(self, timeout: float = 600.0) -> CoreInfo:
        if self.spawn:
            ctx = multiprocessing.get_context("spawn")
            self._process = ctx.Process(
                target=run_core,
                name="tokenfab-engine-core",
                daemon=True,
                args=(self.config, _connectable(self.addresses.to_core), _connectable(self.addresses.from_core)),
            )
            self._process.start()
        deadline = time.monotonic() + timeout
        while True:
            if await self._from_core.poll(500):
                message = from_core_decoder.decode(await self._from_core.recv())
                if isinstance(message, Failed):
                    raise EngineDead(f"engine core failed to start:\n{message.message}")
                if isinstance(message, Ready):
                    self.info = message.info
                    return message.info
            if self._process is not None and not self._process.is_alive():
                raise EngineDead(f"engine core exited with code {self._process.exitcode} while starting")
            if time.monotonic() > deadline:
                raise EngineDead("engine core did not become ready in time")

    async def add(self, requests: list[CoreRequest]) -> None:
        await self._send(AddRequests(requests))

    async def abort(self, request_ids: list[str]) -> None:
        if self.alive:
            with contextlib.suppress(EngineDead):  # a core that died holds nothing to abort
                await self._send(Abort(request_ids))

    async def _send(self, message: ToCore) -> None:
        """Queue a message for the core; raises EngineDead when the core has gone (a PUSH socket without its peer
        would otherwise wait for one forever)."""
        data = encoder.encode(message)
        while True:
            try:
                await self._to_core.send(data, flags=zmq.NOBLOCK)
                return
            except zmq.Again:
                gone = self._gone()
                if gone is not None:
                    raise EngineDead(gone) from None
                await asyncio.sleep(0.01)

    async def _next(self) -> FromCore:
        while not await self._from_core.poll(1000):
            gone = self._gone()
            if gone is not None:
                raise EngineDead(gone)
        return from_core_decoder.decode(await self._from_core.recv())

    def _gone(self) -> str | None:
        """Why the core has exited, once it has (checked while its socket is quiet)."""
        if self._process is not None and not self._process.is_alive():
            return f"engine core exited with code {self._process.exitcode}"
        return None

    @property
    def alive(self) -> bool:
        if self.dead is not None or self.info is None:
            return False
        return self._process is None or self._process.is_alive()

    @property
    def pid(self) -> int | None:
        """The core's process id, when this client spawned it."""
        return self._process.pid if self._process is not None else None

    async def shutdown(self, timeout: float = 10.0) -> None:
        gone = self._gone()  # died before it was asked to stop (and maybe before the reader noticed)
        if self.alive:
            with contextlib.suppress(EngineDead):  # it died meanwhile: nothing left to stop
                await self._send(Shutdown())
        if self._process is not None and self._process.is_alive():
            await asyncio.to_thread(self._process.join, timeout)
            if self._process.is_alive():
                self._process.kill()
        self.dead = self.dead or gone or "shut down"
        self._to_core.close(linger=0 if self._process is not None else 1000)
        self._from_core.close(linger=0)
        self._ctx.term()
        for addr in (self.addresses.to_core, self.addresses.from_core):
            path = addr.removeprefix("ipc://")
            if addr.startswith("ipc://") and os.path.exists(path):
                os.unlink(path)


class InProcessClient(EngineClient):
    """A core on a thread of this process: messages pass as objects, results come back through the event loop."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__()
        self.config = config
        self._inbox: queue.Queue[ToCore] = queue.Queue()
        self._outbox: asyncio.Queue[FromCore] | None = None
        self._thread: threading.Thread | None = None

    async def start(self, timeout: float = 600.0) -> CoreInfo:
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[FromCore] = asyncio.Queue()
        self._outbox = outbox
        self._thread = threading.Thread(target=self._run, args=(loop, outbox), name="tokenfab-engine-core", daemon=True)
        self._thread.start()
        message = await asyncio.wait_for(outbox.get(), timeout)
        if isinstance(message, Failed):
            raise EngineDead(f"engine core failed to start:\n{message.message}")
        assert isinstance(message, Ready)
        self.info = message.info
        return message.info

    def _run(self, loop: asyncio.AbstractEventLoop, outbox: asyncio.Queue[FromCore]) -> None:
        from tokenfab.engine.core import EngineCore

        def send(message: FromCore) -> None:
            loop.call_soon_threadsafe(outbox.put_nowait, message)

        def receive(timeout_ms: int) -> ToCore | None:
            try:
                return self._inbox.get(timeout=timeout_ms / 1000) if timeout_ms else self._inbox.get_nowait()
            except queue.Empty:
                return None

        try:
            core = EngineCore(self.config)
            send(Ready(core.info()))
            serve_core(core, receive, send, lambda: not loop.is_closed())
        except Exception:  # noqa: BLE001 - the front end must hear why the core died
            send(Failed(traceback.format_exc(limit=8)))

    async def add(self, requests: list[CoreRequest]) -> None:
        self._inbox.put(AddRequests(requests))

    async def abort(self, request_ids: list[str]) -> None:
        self._inbox.put(Abort(request_ids))

    async def _next(self) -> FromCore:
        assert self._outbox is not None, "start() first"
        while True:
            try:
                return await asyncio.wait_for(self._outbox.get(), 1.0)
            except TimeoutError:
                if self._thread is None or not self._thread.is_alive():
                    raise EngineDead("engine core thread exited") from None

    @property
    def alive(self) -> bool:
        return self.dead is None and self._thread is not None and self._thread.is_alive()

    async def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._inbox.put(Shutdown())
            await asyncio.to_thread(self._thread.join, timeout)
        self.dead = self.dead or "shut down"


def make_engine_client(config: EngineConfig, transport: str = "ipc", spawn: bool = True) -> EngineClient:
    """`inproc` runs the core on a thread here; anything else is a CoreProcessClient transport spec."""
    if transport == "inproc":
        return InProcessClient(config)
    return CoreProcessClient(config, transport, spawn)
