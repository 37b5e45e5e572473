"""Plain data shared by the engine's managers: sampling parameters, requests, step plans and outputs."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import msgspec

from tokenfab.economics.attribution import RequestCost

if TYPE_CHECKING:
    import torch


MAX_KEEP_KV_S = 3600.0
"""The longest a finished request's KV blocks may be kept (an hour)."""


@dataclass(slots=True)
class SamplingParams:
    """How to pick tokens for one request; validated on construction."""

    n: int = 1
    """Independent completions of the prompt (they share the prompt's KV blocks)."""
    max_tokens: int = 16
    """Upper bound on generated tokens per completion."""
    temperature: float = 1.0
    """0 means greedy."""
    top_p: float = 1.0
    top_k: int = 0
    """0 or -1 disables top-k."""
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    """HF semantics: positive logits of seen tokens divided, negative multiplied."""
    seed: int | None = None
    """Per-request seed: the same seed gives the same tokens whatever else is in the batch."""
    stop: list[str] = field(default_factory=list)
    """Stop strings; the matched string is not included in the output text."""
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    """None: no logprobs; k >= 0: the sampled token's logprob plus the k most likely."""
    prompt_logprobs: int | None = None
    """None: none; k >= 0: each prompt token's logprob (from the second on) plus the k most likely at its
    position, computed in the prefill (such a request takes no prefix-cache hits: every position is computed)."""
    min_tokens: int = 0
    """EOS and stop tokens are suppressed until this many tokens were generated."""
    skip_special_tokens: bool = True
    grammar: str | None = None
    """An llguidance grammar (tokenfab.engine.grammar) every generated token must follow; EOS once complete."""
    keep_kv_s: float = 0.0
    """Seconds the sequence's KV blocks stay in the pool after it finishes (an agent session's next turn finds
    them there), unless the pool needs them for work it would otherwise have to refuse or preempt."""

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (self.n >= 1, "n must be >= 1"),
            (self.max_tokens >= 1, "max_tokens must be >= 1"),
            (self.temperature >= 0.0, "temperature must be >= 0"),
            (0.0 < self.top_p <= 1.0, "top_p must be in (0, 1]"),
            (self.top_k >= 0, "top_k must be >= 0 or -1"),
            (0.0 <= self.min_p <= 1.0, "min_p must be in [0, 1]"),
            (-2.0 <= self.presence_penalty <= 2.0, "presence_penalty must be in [-2, 2]"),
            (-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty must be in [-2, 2]"),
            (self.repetition_penalty > 0.0, "repetition_penalty must be > 0"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs must be in [0, 20]"),
            (0.0 <= self.keep_kv_s <= MAX_KEEP_KV_S, f"keep_kv_s must be in [0, {MAX_KEEP_KV_S:g}]"),
            (self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20, "prompt_logprobs must be in [0, 20]"),
            (0 <= self.min_tokens <= self.max_tokens, "min_tokens must be in [0, max_tokens]"),
            (
                self.grammar is None or (not self.ignore_eos and not self.min_tokens),
                "a grammar ends with EOS: ignore_eos and min_tokens cannot be combined with it",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


class KVTransferParams(msgspec.Struct, gc=False, omit_defaults=True):
    """A sequence's part in a prefill/decode split (vLLM's `kv_transfer_params`, its field names where it has them).

    On the prefill leg, `do_remote_decode`: when the sequence finishes, its prompt's KV blocks stay held for a
    decode replica to pull (until it releases them, or `tokenfab.engine.kv_transfer` times them out); the finished
    output then carries the params a decode replica needs. On the decode leg, `do_remote_prefill`: the blocks of
    the prompt this replica lacks are pulled from `remote_endpoint` before it computes the rest itself (any it
    cannot get are recomputed)."""

    do_remote_decode: bool = False
    do_remote_prefill: bool = False
    remote_engine_id: str | None = None
    """The prefill replica's engine id."""
    remote_endpoint: str | None = None
    """Its KV server (a ZeroMQ address)."""
    transfer_id: str | None = None
    """What the prefill replica holds the blocks under (its sequence id)."""
    transport: str | None = None
    """shm (read the prefill replica's KV memory directly; same host) or tcp (blocks sent over ZeroMQ)."""
    remote_blocks: int = 0
    """Full blocks of the prompt the prefill replica holds."""


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_ABORTED)


@dataclass(slots=True)
class TokenLogprobs:
    """Logprob of the sampled token and the top-k alternatives at one position."""

    token_id: int
    logprob: float
    rank: int
    top: list[tuple[int, float]]


@dataclass(slots=True)
class Request:
    """One sequence being generated; the scheduler catches num_computed_tokens up to num_tokens."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival: float
    priority: int = 0
    """Lower runs first; ties go by arrival (FCFS)."""
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    output_logprobs: list[TokenLogprobs] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0
    """Prompt tokens found in the prefix cache when the request was (last) admitted."""
    status: RequestStatus = RequestStatus.WAITING
    stop_reason: int | None = None
    """The stop token id that finished it (stop strings are matched in the front end)."""
    num_preemptions: int = 0
    first_scheduled: float | None = None
    """time.monotonic() when it was first given tokens (its queue time ends there)."""
    spec_token_ids: list[int] = field(default_factory=list)
    """Draft tokens proposed after the last step, for the next step to verify (never part of the sequence)."""
    spec_probs: torch.Tensor | None = None
    """Draft distributions [len(spec_token_ids), vocab] the drafts were sampled from; None: chosen
    deterministically (the draft distribution is one-hot)."""
    kv_transfer: KVTransferParams | None = None
    """Its part in a prefill/decode split, if any."""

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def finished(self) -> bool:
        return self.status.finished


@dataclass(slots=True)
class ScheduledRequest:
    """One request's share of a step: compute tokens [start, start + num_tokens), the last num_spec of them
    draft tokens (positions num_tokens.. of the request) that this step verifies."""

    request: Request
    start: int
    num_tokens: int
    spec_token_ids: list[int] = field(default_factory=list)
    spec_probs: torch.Tensor | None = None
    """[num_spec, vocab] draft distributions, or None for deterministic drafts."""

    @property
    def end(self) -> int:
        return self.start + self.num_tokens

    @property
    def num_spec(self) -> int:
        return len(self.spec_token_ids)

    @property
    def samples(self) -> bool:
        """A request samples a token once its step reaches the last known token."""
        return self.end - self.num_spec == self.request.num_tokens

    @property
    def num_logit_rows(self) -> int:
        """Positions whose next-token distribution this step needs: the last known token and each draft."""
        return 1 + self.num_spec if self.samples else 0

    def token_ids(self) -> list[int]:
        """The tokens this step feeds to the model."""
        tokens = self.request.all_token_ids[self.start : self.end]
        return tokens + self.spec_token_ids if self.spec_token_ids else tokens


@dataclass(slots=True)
class StepPlan:
    """What the scheduler decided for one engine step."""

    scheduled: list[ScheduledRequest]
    preempted: list[Request]
    num_batched_tokens: int

    @property
    def empty(self) -> bool:
        return not self.scheduled


@dataclass(slots=True)
class SampleResult:
    token_ids: list[list[int]]
    """Per request, the tokens it emits this step (its accepted drafts, then one sampled token)."""
    logprobs: list[list[TokenLogprobs] | None]
    num_accepted: list[int]
    """Per request, how many of its drafts were accepted."""


@dataclass(slots=True)
class CompletionOutput:
    """One completion's state as seen by a caller."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    logprobs: list[TokenLogprobs] | None = None


@dataclass(slots=True)
class RequestMetrics:
    """time.monotonic() stamps of a request's life (queue time = first_scheduled - arrival)."""

    arrival: float
    first_scheduled: float | None = None
    first_token: float | None = None


@dataclass(slots=True)
class RequestOutput:
    """A prompt with its completions; `finished` once every completion ended."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    cost: RequestCost | None = None
    """Summed over the completions: this request's share of every step it took part in."""
    metrics: RequestMetrics | None = None
    error: str | None = None
    """Why the engine refused the request, when it did."""
    prompt_logprobs: list[TokenLogprobs] | None = None
    """With SamplingParams.prompt_logprobs: prompt tokens 1.. (the first has no context to be scored in)."""
