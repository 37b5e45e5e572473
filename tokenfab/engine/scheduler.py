"""Scheduler: token catch-up under a per-step budget.

Every request holds num_computed_tokens and num_tokens; a step gives each running request the tokens it still
needs (decodes 1, prefills a chunk), then admits waiting requests while budget, sequence slots and KV blocks last.
Prefix-cache hits start a request with tokens already computed; when blocks run out the lowest-priority running
request is preempted and recomputed later. Siblings of an n > 1 request wait until the first has computed the
prompt, so they share its KV blocks through the prefix cache.

Speculative draft tokens ride on the same rule: a decoding request with k drafts needs 1 + k tokens. Drafts are
the first thing given up: when the budget or the KV blocks run short, a request keeps fewer (or none) of them
before anyone is preempted.

After the model ran, `update` applies the step: computed tokens advance, sampled tokens are appended up to the
first stop, blocks that became full are cached, the blocks of rejected drafts are given back and finished
requests are freed. It ends at one hook point: every function in `hooks` gets the step's `StepUpdate` (what each
request emitted and the KV events of the step) — where KV event publishers, tiers and transfers attach.
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Callable
from dataclasses import dataclass

import msgspec

from tokenfab.engine.kv_cache_manager import KVCacheManager
from tokenfab.engine.kv_events import KVEvent
from tokenfab.engine.stats import SchedulerStats
from tokenfab.engine.types import Request, RequestStatus, SampleResult, ScheduledRequest, StepPlan, TokenLogprobs


@dataclass(slots=True)
class Emitted:
    """What one step appended to one request."""

    request: Request
    token_ids: list[int]
    logprobs: list[TokenLogprobs] | None
    status: RequestStatus | None
    """How it finished in this step, if it did."""


@dataclass(slots=True)
class StepUpdate:
    """One step, applied: handed to every hook."""

    plan: StepPlan
    emitted: list[Emitted]
    kv_events: list[KVEvent]
    """Changes to the cached blocks since the previous update (empty unless the KV manager records them)."""


StepHook = Callable[[StepUpdate], None]


class Scheduler:
    def __init__(
        self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int = 1 << 62
    ) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.counters = SchedulerStats()
        """Monotonic counters (the gauges are filled in by stats())."""
        self.hooks: list[StepHook] = []
        self._waiting: list[tuple[int, float, int, Request]] = []
        self._order = itertools.count()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.leaders: dict[str, Request] = {}
        """Sibling request id -> the sibling that computes the shared prompt first."""

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_preemptions(self) -> int:
        return self.counters.num_preemptions

    def stats(self) -> SchedulerStats:
        return msgspec.structs.replace(self.counters, num_running=len(self.running), num_waiting=len(self._waiting))

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self.running)

    def add(self, request: Request, leader: Request | None = None) -> None:
        self.requests[request.request_id] = request
        if leader is not None:
            self.leaders[request.request_id] = leader
        self._push(request)

    def _push(self, request: Request) -> None:
        heapq.heappush(self._waiting, (request.priority, request.arrival, next(self._order), request))

    def schedule(self) -> StepPlan:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledRequest] = []
        preempted: list[Request] = []
        budget = self._schedule_running(budget, scheduled, preempted)
        if not preempted:
            budget = self._admit_waiting(budget, scheduled)
        return StepPlan(scheduled, preempted, self.max_num_batched_tokens - budget)

    def _schedule_running(self, budget: int, scheduled: list[ScheduledRequest], preempted: list[Request]) -> int:
        i = 0
        while i < len(self.running) and budget > 0:
            request = self.running[i]
            needed = request.num_tokens - request.num_computed_tokens
            n = min(needed, budget)
            num_spec = min(len(request.spec_token_ids), budget - n) if n == needed else 0
            if num_spec and not self.kv.allocate_slots(request, n + num_spec):
                num_spec = 0
            while not num_spec and not self.kv.allocate_slots(request, n):
                # Only requests not yet given tokens this step may be evicted (the current one included).
                victim = max(self.running[i:], key=lambda r: (r.priority, r.arrival))
                self._preempt(victim)
                preempted.append(victim)
                if victim is request:
                    break
            else:
                scheduled.append(self._take_drafts(ScheduledRequest(request, request.num_computed_tokens, n), num_spec))
                budget -= n + num_spec
                i += 1
        return budget

    @staticmethod
    def _take_drafts(s: ScheduledRequest, num_spec: int) -> ScheduledRequest:
        """Move the request's first num_spec drafts into the step; the rest are dropped (proposals are only
        good for the step right after them)."""
        request = s.request
        if num_spec:
            s.spec_token_ids = request.spec_token_ids[:num_spec]
            s.spec_probs = None if request.spec_probs is None else request.spec_probs[:num_spec]
            s.num_tokens += num_spec
        request.spec_token_ids, request.spec_probs = [], None
        return s

    def _preempt(self, request: Request) -> None:
        self.running.remove(request)
        self.kv.free(request)
        request.spec_token_ids, request.spec_probs = [], None
        request.status = RequestStatus.PREEMPTED
        request.num_computed_tokens = 0
        request.num_preemptions += 1
        self.counters.num_preemptions += 1
        self._push(request)

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledRequest]) -> int:
        deferred: list[tuple[int, float, int, Request]] = []
        while self._waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            entry = heapq.heappop(self._waiting)
            request = entry[3]
            if request.finished:
                continue
            if self._waits_for_leader(request):
                deferred.append(entry)
                continue
            request.num_computed_tokens = self.kv.get_computed_blocks(request)
            request.num_cached_tokens = request.num_computed_tokens
            n = min(request.num_tokens - request.num_computed_tokens, budget)
            if not self.kv.allocate_slots(request, n):
                self.kv.free(request)
                request.num_computed_tokens = 0
                deferred.append(entry)
                break
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            scheduled.append(ScheduledRequest(request, request.num_computed_tokens, n))
            budget -= n
        for entry in deferred:
            heapq.heappush(self._waiting, entry)
        return budget

    def _waits_for_leader(self, request: Request) -> bool:
        leader = self.leaders.get(request.request_id)
        if leader is None or leader.finished or leader.status == RequestStatus.WAITING:
            return False
        return leader.num_computed_tokens < leader.num_prompt_tokens - 1

    def finish(self, request: Request, status: RequestStatus) -> None:
        """Mark finished and give its blocks back at once (also used for aborts)."""
        if request.finished:
            return
        request.status = status
        if request in self.running:
            self.running.remove(request)
        self.kv.free(request)
        request.spec_token_ids, request.spec_probs = [], None
        self.requests.pop(request.request_id, None)
        self.leaders.pop(request.request_id, None)

    def abort(self, request_id: str) -> Request | None:
        request = self.requests.get(request_id)
        if request is None:
            return None
        if not request.finished and request.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED):
            self._waiting = [e for e in self._waiting if e[3] is not request]
            heapq.heapify(self._waiting)
        self.finish(request, RequestStatus.FINISHED_ABORTED)
        return request

    # -- after the model ran ------------------------------------------------------------------------------------

    def update(self, plan: StepPlan, samplers: list[ScheduledRequest], result: SampleResult) -> StepUpdate:
        """Apply one executed step (`samplers`: the scheduled requests that sampled, in `result`'s order)."""
        c = self.counters
        c.steps += 1
        c.tokens_computed += plan.num_batched_tokens
        now = time.monotonic()
        for s in plan.scheduled:
            request = s.request
            c.prompt_tokens_computed += max(0, min(s.end, request.num_prompt_tokens) - s.start)
            if request.first_scheduled is None:
                request.first_scheduled = now
            if not s.samples:
                request.num_computed_tokens = s.end
                self.kv.cache_full_blocks(request)
        emitted = [
            self._append(s, tokens, logprobs, accepted)
            for s, tokens, logprobs, accepted in zip(samplers, result.token_ids, result.logprobs, result.num_accepted)
        ]
        self.kv.prefetch()  # kept sessions' blocks the pool gave up, back from the KV tiers while there is room
        update = StepUpdate(plan, emitted, self.kv.take_events())
        for hook in self.hooks:
            hook(update)
        return update

    def _append(
        self, s: ScheduledRequest, tokens: list[int], logprobs: list[TokenLogprobs] | None, accepted: int
    ) -> Emitted:
        """Append a sampling request's tokens up to the first stop; its KV counts up to the last accepted draft."""
        request = s.request
        known = request.num_tokens
        status = None
        for n, token in enumerate(tokens, 1):
            request.output_token_ids.append(token)
            status = self._stop_status(request, token)
            if status is not None:
                tokens, logprobs = tokens[:n], None if logprobs is None else logprobs[:n]
                break
        self.counters.generated_tokens += len(tokens)
        request.num_computed_tokens = min(known + accepted, request.num_tokens)
        if s.num_spec:
            self.kv.rollback(request)
        self.kv.cache_full_blocks(request)
        if status is not None:
            self.finish(request, status)
        return Emitted(request, tokens, logprobs, status)

    def _stop_status(self, request: Request, token: int) -> RequestStatus | None:
        p = request.params
        if request.num_output_tokens >= p.min_tokens:
            if token in p.stop_token_ids:
                request.stop_reason = token
                return RequestStatus.FINISHED_STOPPED
            if not p.ignore_eos and token in request.eos_token_ids:
                return RequestStatus.FINISHED_STOPPED
        if request.num_output_tokens >= p.max_tokens or request.num_tokens >= self.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
