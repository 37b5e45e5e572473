"""Connection limits under uvicorn: idle and half-sent connections are closed, and open connections are capped.

uvicorn's h11 protocol arms its keep-alive timer only after a response, and disarms it whenever bytes arrive, so a
socket that connects and sends nothing, or sends half a header, stays open for good; enough of them exhaust the
process's file descriptors. Here every connection that has no request in progress (just opened, or between
requests) must deliver a complete request head within `header_timeout` seconds (up to half as long again, spread
at random so that sockets opened together are not all closed, and reopened, together) or is closed. Beyond
`max_connections` open connections, the longest-idle one is closed to make room; if none is idle, the new one is
refused. So thousands of idle sockets cost others nothing but a bounded set of file descriptors, and nothing is
logged per connection (the counts are metrics).
"""

from __future__ import annotations

import asyncio
import logging
import random
import resource
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("tokenfab.serve")
FD_RESERVE = 256
"""File descriptors kept for everything but client connections (engine sockets, logs, the model's files)."""


def connection_cap(requested: int) -> int:
    """Raise the soft file-descriptor limit to the hard one and keep the cap below it, so accepting never fails
    with EMFILE (which asyncio logs on every retry)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, requested + FD_RESERVE)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    cap = min(requested, max(16, soft - FD_RESERVE))
    if cap < requested:
        log.warning("max connections %d lowered to %d: the process may open %d files", requested, cap, soft)
    return cap


def guarded_protocol(
    max_connections: int, header_timeout: float, on_close: Callable[[str], None] = lambda reason: None
) -> type[H11Protocol]:
    """An h11 protocol class whose connections share one idle registry and the limits above. `on_close(reason)`
    is called for each connection closed by a limit: header_timeout, evicted or refused."""
    idle: OrderedDict[GuardedProtocol, None] = OrderedDict()
    """Connections without a request in progress, longest idle first."""

    class GuardedProtocol(H11Protocol):
        _timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if len(self.connections) > max_connections and not self._evict_one():
                on_close("refused")
                transport.abort()
                return
            self._become_idle()

        def connection_lost(self, exc: Exception | None) -> None:
            self._stop_idling()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not None and not self.cycle.response_complete:
                self._stop_idling()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._become_idle()

        def _become_idle(self) -> None:
            self._stop_idling()
            idle[self] = None
            delay = header_timeout * (1.0 + 0.5 * random.random())
            self._timer = self.loop.call_later(delay, self._idle_too_long)

        def _stop_idling(self) -> None:
            idle.pop(self, None)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _idle_too_long(self) -> None:
            self._timer = None
            self._close("header_timeout")

        def _evict_one(self) -> bool:
            for other in idle:
                if other is not self:
                    other._close("evicted")
                    return True
            return False

        def _close(self, reason: str) -> None:
            self._stop_idling()
            if not self.transport.is_closing():
                on_close(reason)
                self.transport.abort()

    return GuardedProtocol
