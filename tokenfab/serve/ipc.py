"""The front end <-> engine core channel: tagged msgspec structs over two ZeroMQ PUSH/PULL sockets.

One serializer (msgpack) for every message; a message is a struct, never a method name. The front end binds
both sockets and the core connects, so the core can be restarted against the same addresses.
"""

from __future__ import annotations

import msgspec

from tokenfab.engine.messages import CoreOutput, CoreRequest, EngineStats


class AddRequests(msgspec.Struct, tag=True):
    requests: list[CoreRequest]


class Abort(msgspec.Struct, tag=True):
    request_ids: list[str]


class Shutdown(msgspec.Struct, tag=True):
    """Abort everything and exit."""


class CoreInfo(msgspec.Struct):
    """What the front end needs to validate requests before they reach the core."""

    model_path: str
    max_model_len: int
    vocab_size: int
    kv_capacity_tokens: int
    max_num_seqs: int
    max_num_batched_tokens: int
    dtype: str
    energy_source: str
    meter: str
    usd_per_hour: float
    usd_per_kwh: float
    quantization: str = "none"
    """Weight formats of the linear layers (a plan label, with a quantized checkpoint's own format)."""
    weight_bytes: int = 0
    """Weight bytes a single-token forward reads."""
    kernel_isa: str = "torch"
    """The ISA level tokenfab's CPU kernels run at (tokenfab.platform.cpu_isa), or torch where none runs."""
    kernel_isa_reason: str = ""
    """Why that level: the best the CPU has, TOKENFAB_CPU_ISA, or why the kernels cannot run."""
    cpu_flags: list[str] = []
    """The CPU's vector-extension flags."""
    batch_invariant: bool = False
    """Whether the engine runs in batch-invariant mode (EngineConfig.batch_invariant)."""


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
