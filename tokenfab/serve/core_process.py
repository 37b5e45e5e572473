"""The engine core process: receive requests and aborts, step the engine while there is work, send diffs back.

It runs the model and nothing else, so the HTTP front end (parsing, tokenizing, detokenizing, streaming) never
competes with it for the GIL. When idle it blocks on its input socket; it exits on Shutdown or when its parent
dies.
"""

from __future__ import annotations

import os
import signal
import traceback

import zmq

from tokenfab.config import EngineConfig
from tokenfab.engine.core import EngineCore
from tokenfab.engine.messages import CoreOutput
from tokenfab.serve.ipc import (Abort, AddRequests, Failed, Ready, Shutdown, StepResult, encoder,
                                to_core_decoder)

IDLE_POLL_MS = 1000
"""How often an idle core checks that its parent is alive."""


def run_core(config: EngineConfig, input_addr: str, output_addr: str) -> None:
    """Process entry point."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole group; the front end shuts us down
    parent = os.getppid()
    ctx = zmq.Context()
    inbox = ctx.socket(zmq.PULL)
    inbox.connect(input_addr)
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(output_addr)
    try:
        core = EngineCore(config)
        outbox.send(encoder.encode(Ready(core.info())))
        _loop(core, inbox, outbox, parent)
    except Exception:  # noqa: BLE001 - whatever killed the core, the front end must hear why
        outbox.send(encoder.encode(Failed(traceback.format_exc(limit=8))))
    finally:
        outbox.close(linger=1000)
        inbox.close(linger=0)
        ctx.term()


def _loop(core: EngineCore, inbox: zmq.Socket, outbox: zmq.Socket, parent: int) -> None:
    while True:
        rejected: list[CoreOutput] = []
        timeout = 0 if core.has_unfinished() else IDLE_POLL_MS
        received = False
        while inbox.poll(timeout):
            message = to_core_decoder.decode(inbox.recv())
            if isinstance(message, Shutdown):
                core.abort_all()
                core.close()
                return
            _handle(core, message, rejected)
            received, timeout = True, 0
        if not received and not core.has_unfinished() and os.getppid() != parent:
            return
        outputs = core.step() if core.has_unfinished() else []
        if outputs or rejected or received:
            outbox.send(encoder.encode(StepResult(rejected + outputs, core.stats())))


def _handle(core: EngineCore, message: AddRequests | Abort, rejected: list[CoreOutput]) -> None:
    if isinstance(message, Abort):
        core.abort(message.request_ids)
        return
    for request in message.requests:
        try:
            core.add_request(request)
        except ValueError as e:
            rejected.append(CoreOutput(request.request_id, [], finish_reason="abort", error=str(e)))
