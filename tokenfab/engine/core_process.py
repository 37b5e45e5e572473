"""The engine core's service loop: receive requests and aborts, step while there is work, send diffs back.

`serve_core` is the loop, over any inbox/outbox pair: ZeroMQ sockets in a core process (`run_core`, which a front
end spawns or which `tokenfab core --connect` starts on another host), or queues for a core on a thread of the
front end's own process. It runs the model and nothing else, so parsing, tokenizing and detokenizing never
compete with it for the GIL. When idle it blocks on its inbox; a spawned core exits when its parent dies.
"""

from __future__ import annotations

import os
import signal
import time
import traceback
from collections.abc import Callable

import zmq

from tokenfab.config import EngineConfig
from tokenfab.engine.core import EngineCore
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
    to_core_decoder,
)
from tokenfab.engine.messages import CoreOutput
from tokenfab.platform.logs import log_to_stderr

IDLE_POLL_MS = 1000
"""How often an idle core checks that it should go on (its parent is alive, it was not stopped)."""
EXPORT_POLL_MS = 50
"""How often an idle core that holds prefill legs' KV frees what decode replicas released."""
GROUP_POLL_MS = 2
"""How long an idle rank of an expert-parallel group waits for requests before it asks the group whether any
rank has work (a rank with work waits for the others at that question)."""
GROUP_IDLE_POLL_MS = 40
"""The wait it backs off to (doubling from GROUP_POLL_MS) while the whole group stays idle: an idle group then
costs a few all-reduces a second instead of hundreds, and the first request after a quiet spell waits at most this
long for the other ranks."""

Receive = Callable[[int], ToCore | None]
"""Wait up to the given milliseconds for the next message; None when none came."""
Send = Callable[[FromCore], None]


def serve_core(core: EngineCore, receive: Receive, send: Send, keep_going: Callable[[], bool]) -> None:
    """Run until Shutdown (or until keep_going() says stop while idle). The core's stats go out once at the start,
    so its gauges (KV capacity among them) are known before the first request."""
    send(StepResult([], core.stats()))
    if core.ranks is not None:
        _serve_rank(core, receive, send, keep_going)
        return
    while True:
        taken = _take_messages(
            core, receive, 0 if core.has_unfinished() else EXPORT_POLL_MS if core.holds_exports else IDLE_POLL_MS
        )
        if taken is None:
            return
        rejected, received = taken
        if not received and not core.has_unfinished() and not keep_going():
            core.close()
            return
        freed = core.tick()
        stepped = core.has_unfinished()
        outputs = core.step() if stepped else []
        if stepped or rejected or received or freed:  # every step, so a long prefill shows progress too
            send(StepResult(rejected + outputs, core.stats()))


def _serve_rank(core: EngineCore, receive: Receive, send: Send, keep_going: Callable[[], bool]) -> None:
    """serve_core for one rank of an expert-parallel group: every pass of the loop asks the group whether any rank
    has work and, if so, takes its part of one step (tokenfab.engine.expert_ranks)."""
    idle_since = time.monotonic()
    poll = GROUP_POLL_MS
    while True:
        taken = _take_messages(core, receive, 0 if core.has_unfinished() else poll)
        if taken is None:
            return
        rejected, received = taken
        outputs = core.group_step()
        poll = GROUP_POLL_MS if outputs is not None else min(2 * poll, GROUP_IDLE_POLL_MS)
        if outputs is None and time.monotonic() - idle_since > IDLE_POLL_MS / 1000:
            idle_since = time.monotonic()
            if not keep_going():
                core.close()
                return
        if outputs is not None or rejected or received:  # idle parts too: its experts' load is in its stats
            send(StepResult(rejected + (outputs or []), core.stats()))


def _take_messages(core: EngineCore, receive: Receive, timeout: int) -> tuple[list[CoreOutput], bool] | None:
    """Apply what has arrived, waiting up to `timeout` ms for the first message: the outputs of the requests the
    core refused and whether anything came; None after Shutdown (the core is closed)."""
    rejected: list[CoreOutput] = []
    received = False
    while (message := receive(timeout)) is not None:
        if isinstance(message, Shutdown):
            core.abort_all()
            core.close()
            return None
        _handle(core, message, rejected)
        received, timeout = True, 0
    return rejected, received


def _handle(core: EngineCore, message: AddRequests | Abort, rejected: list[CoreOutput]) -> None:
    if isinstance(message, Abort):
        core.abort(message.request_ids)
        return
    for request in message.requests:
        try:
            core.add_request(request)
        except ValueError as e:
            rejected.append(CoreOutput(request.request_id, [], finish_reason="abort", error=str(e)))


def run_core(config: EngineConfig, input_addr: str, output_addr: str, watch_parent: bool = True) -> None:
    """Process entry point: connect to a front end's two sockets, load the model, serve until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the front end shuts us down
    log_to_stderr()  # start-up steps (loading, building kernels) beside the front end's lines
    parent = os.getppid()
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(output_addr)

    def receive(timeout_ms: int) -> ToCore | None:
        return to_core_decoder.decode(inbox.recv()) if inbox.poll(timeout_ms) else None

    def send(message: FromCore) -> None:
        outbox.send(encoder.encode(message))

    try:
        core = EngineCore(config)
        send(Ready(core.info()))
        serve_core(core, receive, send, lambda: not watch_parent or os.getppid() == parent)
    except Exception:  # noqa: BLE001 - whatever killed the core, the front end must hear why
        send(Failed(traceback.format_exc(limit=8)))
    finally:
        outbox.close(linger=1000)
        inbox.close(linger=0)
        ctx.term()
