"""Prompt logprobs: each prompt token's logprob (and the top-k at its position) from the prefill that already runs.

A prefill chunk over positions [start, end) has the final hidden state of every position; position p's logits
score prompt token p + 1. Only the rows of requests that asked go through the LM head, in one call per step. The
values are kept until the sequence emits its first token (the prefill is then complete) and sent with it, once;
a sequence preempted before that is recomputed from scratch, and its partial list dropped. Such a request takes no
prefix-cache hits (tokenfab.engine.kv_cache_manager), so no position is skipped.
"""

from __future__ import annotations

import torch

from tokenfab.engine.model_runner import RunOutput
from tokenfab.engine.sampler import token_logprobs
from tokenfab.engine.types import Request, StepPlan, TokenLogprobs
from tokenfab.models.decoder import DecoderModel


class PromptLogprobs:
    def __init__(self, model: DecoderModel) -> None:
        self.model = model
        self._pending: dict[str, list[TokenLogprobs]] = {}
        self._sent: set[str] = set()

    @torch.inference_mode()
    def collect(self, plan: StepPlan, run: RunOutput) -> None:
        """Score the prompt positions this step computed for the requests that asked."""
        rows: list[int] = []
        targets: list[int] = []
        ks: list[int] = []
        owners: list[tuple[str, int]] = []
        for s in plan.scheduled:
            request = s.request
            k = request.params.prompt_logprobs
            if k is None or request.request_id in self._sent:
                continue
            last = min(s.end, request.num_prompt_tokens - 1)  # the last prompt position scores a new token
            if s.start >= last:
                continue
            base = run.token_start[request.request_id] - s.start
            rows.extend(base + p for p in range(s.start, last))
            targets.extend(request.prompt_token_ids[s.start + 1 : last + 1])
            ks.extend([k] * (last - s.start))
            owners.append((request.request_id, last - s.start))
        if not rows:
            return
        hidden = run.hidden.index_select(0, torch.tensor(rows, dtype=torch.long, device=run.hidden.device))
        scored = token_logprobs(self.model.compute_logits(hidden), targets, ks)
        at = 0
        for request_id, n in owners:
            self._pending.setdefault(request_id, []).extend(scored[at : at + n])
            at += n

    def take(self, request: Request) -> list[TokenLogprobs] | None:
        """The request's prompt logprobs with its first emitted token; None before, after, or when not asked."""
        if request.params.prompt_logprobs is None or request.request_id in self._sent:
            return None
        self._sent.add(request.request_id)
        return self._pending.pop(request.request_id, [])

    def forget(self, request_id: str, finished: bool) -> None:
        if request_id not in self._sent:
            self._pending.pop(request_id, None)  # preempted mid-prefill: recomputed from the start
        if finished:
            self._sent.discard(request_id)
