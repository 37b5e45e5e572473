"""Typed messages across the engine core's boundary: what goes in (requests) and what comes out (token diffs, stats).

They are msgspec structs so the same objects serve the in-process engine and the engine core process (one
serializer, `tokenfab.engine.ipc`). After a request is added, only diffs travel: each output carries the tokens
sampled in that step, plus the request's running cost.
"""

from __future__ import annotations

import msgspec

from tokenfab.economics.attribution import RequestCost
from tokenfab.engine.stats import EngineStats
from tokenfab.engine.types import KVTransferParams, SamplingParams, TokenLogprobs

__all__ = ["CoreInfo", "CoreOutput", "CoreRequest", "EngineStats"]


class CoreRequest(msgspec.Struct, gc=False):
    """One sequence for the core to generate (an n > 1 request arrives as n of these)."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    """Always n == 1 here: the front end fans n out into siblings."""
    arrival: float
    """time.monotonic() of arrival (CLOCK_MONOTONIC is shared by processes on one host)."""
    priority: int = 0
    leader_id: str | None = None
    """A sibling waits until its leader has computed the shared prompt, then reuses its KV blocks."""
    eos_token_ids: list[int] | None = None
    """None: the model's own EOS ids."""
    output_token_ids: list[int] = []
    """Tokens this sequence already generated elsewhere (a request migrated from another replica): the core
    recomputes their KV, counts them as output (max_tokens, min_tokens, penalties, the grammar's state, a seeded
    request's random stream) and sends only what it generates after them."""
    kv_transfer: KVTransferParams | None = None
    """Its part in a prefill/decode split: hold its prompt's KV for a decode replica, or pull it from a prefill
    replica (tokenfab.engine.kv_transfer)."""


class CoreOutput(msgspec.Struct, gc=False):
    """What one step did for one sequence: the new token(s), and how it finished if it did."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs] | None = None
    finish_reason: str | None = None
    """stop | length | abort (None while running)."""
    stop_reason: int | None = None
    """The stop token id that ended it, if one did."""
    num_cached_tokens: int = 0
    first_scheduled: float | None = None
    cost: RequestCost | None = None
    """Cumulative for this sequence."""
    error: str | None = None
    """Set when the core refused the request (it is then finished with reason abort)."""
    prompt_logprobs: list[TokenLogprobs] | None = None
    """Sent once, with the sequence's first token, when its params ask for prompt logprobs."""
    lost: str | None = None
    """Set by a router when the sequence's replica was lost and it could not continue on another (why)."""
    kv_transfer: KVTransferParams | None = None
    """On the finished output of a prefill leg: where a decode replica pulls the prompt's KV from."""


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
    block_size: int = 16
    """Tokens per KV block (what a router hashing prompts into blocks needs)."""
    kv_events_endpoint: str | None = None
    """Where the core publishes KV events (the bound address), if it does."""
    kv_events_replay_endpoint: str | None = None
    kv_transport: str | None = None
    """shm or tcp where the core moves KV for prefill/decode splits (its KV server at kv_transfer_endpoint)."""
    kv_transfer_endpoint: str | None = None
