"""OutputProcessor: the front end's view of requests — fan-out of n, detokenization, stop strings, grouping.

It consumes the core's per-step token diffs (`CoreOutput`) and keeps everything text-shaped out of the core's hot
loop. Text is decoded with `tokenizers`' DecodeStream, which holds back bytes of a multi-byte character until it
is complete. While streaming, the last (longest stop string - 1) characters are held back too, so a stop string
that arrives split across tokens is never shown. A stop-string hit finishes the completion here; the caller tells
the core to abort that sequence.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, fields

from tokenizers.decoders import DecodeStream

from tokenfab.economics.attribution import RequestCost
from tokenfab.engine.messages import CoreOutput, CoreRequest
from tokenfab.engine.types import CompletionOutput, RequestMetrics, RequestOutput, SamplingParams, TokenLogprobs
from tokenfab.tokenizer import Tokenizer


@dataclass(slots=True)
class Completion:
    """One completion's state (one core sequence)."""

    child_id: str
    index: int
    params: SamplingParams
    stream: DecodeStream
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    cost: RequestCost = field(default_factory=RequestCost)
    num_cached_tokens: int = 0
    first_scheduled: float | None = None
    error: str | None = None
    prompt_logprobs: list[TokenLogprobs] | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def add(self, tokenizer: Tokenizer, out: CoreOutput) -> None:
        """Take one step's tokens (several with speculative decoding); a stop string ends the completion at the
        token that completed it, and later tokens of the same step are dropped."""
        stopped = False
        for i, token in enumerate(out.new_token_ids):
            before = len(self.text)
            self.token_ids.append(token)
            if out.new_logprobs:
                self.logprobs.append(out.new_logprobs[i])
            piece = self.stream.step(tokenizer.inner, token)
            if piece:
                self.text += piece
            if self._check_stop(before):
                stopped = True
                break
        if out.cost is not None:
            self.cost = out.cost
        self.num_cached_tokens = out.num_cached_tokens
        self.first_scheduled = self.first_scheduled or out.first_scheduled
        self.error = out.error
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if not stopped and out.finish_reason is not None:
            self.finish_reason, self.stop_reason = out.finish_reason, out.stop_reason

    def _check_stop(self, before: int) -> bool:
        for stop in self.params.stop:
            at = self.text.find(stop, max(0, before - len(stop) + 1))
            if at != -1:
                self.text = self.text[:at]
                self.finish_reason, self.stop_reason = "stop", stop
                return True
        return False

    def visible_text(self) -> str:
        hold = max((len(s) for s in self.params.stop), default=1) - 1
        return self.text if self.finished or hold == 0 else self.text[: max(0, len(self.text) - hold)]


@dataclass(slots=True)
class Group:
    """A prompt's completions (n of them) under the caller-facing request id."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    arrival: float
    children: list[Completion] = field(default_factory=list)
    first_token_time: float | None = None

    @property
    def finished(self) -> bool:
        return all(c.finished for c in self.children)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.groups: dict[str, Group] = {}
        self._children: dict[str, tuple[Group, Completion]] = {}

    def add_group(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        arrival: float,
        priority: int = 0,
    ) -> list[CoreRequest]:
        """Register a request and return the sequences the core must run (n siblings for n > 1)."""
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        group = Group(request_id, prompt, list(prompt_token_ids), arrival)
        eos = list(self.tokenizer.eos_token_ids) or None
        core: list[CoreRequest] = []
        for index in range(params.n):
            child_id, child_params = _child(request_id, index, params)
            comp = Completion(child_id, index, child_params, self.tokenizer.decode_stream(params.skip_special_tokens))
            group.children.append(comp)
            self._children[child_id] = (group, comp)
            leader = core[0].request_id if core else None
            core.append(CoreRequest(child_id, group.prompt_token_ids, child_params, arrival, priority, leader, eos))
        self.groups[request_id] = group
        return core

    def add_prompt(
        self, request_id: str, prompt: str | list[int], params: SamplingParams, arrival: float, priority: int = 0
    ) -> list[CoreRequest]:
        """add_group for a prompt given as text (tokenized here) or as token ids."""
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        return self.add_group(request_id, text, ids, params, arrival, priority)

    def child_ids(self, request_id: str) -> list[str]:
        group = self.groups.get(request_id)
        return [c.child_id for c in group.children] if group else []

    def group_of(self, child_id: str) -> str | None:
        """The request a core sequence belongs to (None once it has finished)."""
        entry = self._children.get(child_id)
        return entry[0].request_id if entry is not None else None

    def process(self, outputs: list[CoreOutput], now: float) -> tuple[list[RequestOutput], list[str]]:
        """Apply one step's diffs; returns the changed requests' outputs and the sequences to abort in the core
        (those that hit a stop string). Finished groups are forgotten."""
        to_abort: list[str] = []
        touched: dict[str, Group] = {}
        for out in outputs:
            entry = self._children.get(out.request_id)
            if entry is None or entry[1].finished:
                continue  # aborted or already stopped: a late diff
            group, comp = entry
            comp.add(self.tokenizer, out)
            if comp.finished and out.finish_reason is None:
                to_abort.append(comp.child_id)
            if group.first_token_time is None and comp.token_ids:
                group.first_token_time = now
            touched[group.request_id] = group
        results = [self.make_output(g) for g in touched.values()]
        for g in touched.values():
            self._drop_if_finished(g)
        return results, to_abort

    def abort(self, request_id: str) -> RequestOutput | None:
        """Finish every completion of the request with reason abort; returns its last output."""
        group = self.groups.get(request_id)
        if group is None:
            return None
        for comp in group.children:
            if not comp.finished:
                comp.finish_reason = "abort"
        result = self.make_output(group)
        self._drop_if_finished(group)
        return result

    def make_output(self, group: Group) -> RequestOutput:
        outs = [_completion(c) for c in group.children]
        cost = RequestCost()
        for c in group.children:
            cost.add(c.cost)
        first = group.children[0]
        metrics = RequestMetrics(group.arrival, first.first_scheduled, group.first_token_time)
        error = next((c.error for c in group.children if c.error), None)
        return RequestOutput(
            group.request_id,
            group.prompt,
            group.prompt_token_ids,
            outs,
            group.finished,
            first.num_cached_tokens,
            cost,
            metrics,
            error,
            first.prompt_logprobs,
        )

    def _drop_if_finished(self, group: Group) -> None:
        if group.finished:
            self.groups.pop(group.request_id, None)
            for comp in group.children:
                self._children.pop(comp.child_id, None)


def _child(request_id: str, index: int, params: SamplingParams) -> tuple[str, SamplingParams]:
    if params.n == 1:
        return request_id, params
    seed = None if params.seed is None else sibling_seed(params.seed, index)
    values = {f.name: getattr(params, f.name) for f in fields(params)}
    # The prompt is scored once, by the first sibling (the others share its blocks).
    prompt_logprobs = params.prompt_logprobs if index == 0 else None
    return f"{request_id}#{index}", SamplingParams(
        **{**values, "n": 1, "seed": seed, "prompt_logprobs": prompt_logprobs}
    )


def sibling_seed(seed: int, index: int) -> int:
    """The seed of sibling `index` of a seeded n > 1 request. The first keeps the request's seed (so n = 1 and
    choice 0 agree); the others get a 63-bit digest of (seed, index), so no sibling repeats another request's
    seed the way seed + index would (`seed 7, n 3` choice 1 was `seed 8`)."""
    if index == 0:
        return seed
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8, person=b"tf-sibling").digest()
    return int.from_bytes(digest, "little") >> 1


def _completion(comp: Completion) -> CompletionOutput:
    logprobs = list(comp.logprobs) if comp.params.logprobs is not None else None
    return CompletionOutput(
        comp.index, comp.visible_text(), list(comp.token_ids), comp.finish_reason, comp.stop_reason, logprobs
    )
