"""The front end <-> engine core channel: tagged msgspec structs over two ZeroMQ PUSH/PULL sockets.

One serializer (msgpack) for every message; a message is a struct, never a method name. The front end binds
both sockets and the core connects, so the core can be restarted against the same addresses.
"""

from __future__ import annotations

import msgspec

from tokenfab.engine.messages import CoreInfo, CoreOutput, CoreRequest, EngineStats


class AddRequests(msgspec.Struct, tag=True):
    requests: list[CoreRequest]


class Abort(msgspec.Struct, tag=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True):
    """Abort everything and exit."""


class Ready(msgspec.Struct, tag=True):
    info: CoreInfo


class StepResult(msgspec.Struct, tag=True):
    outputs: list[CoreOutput]
    stats: EngineStats


class Failed(msgspec.Struct, tag=True):
    """The core could not start or died; the message says why."""

    message: str


ToCore = AddRequests | Abort | Shutdown
FromCore = Ready | StepResult | Failed

encoder = msgspec.msgpack.Encoder()
to_core_decoder = msgspec.msgpack.Decoder(ToCore)
from_core_decoder = msgspec.msgpack.Decoder(FromCore)
