"""Draft-model proposer: a smaller model with the same tokenizer runs k steps ahead of the target.

It has its own weights, paged KV cache (same block size, prefix caching as the target's) and runner. Each
request has a shadow sequence in the draft's cache: the target's committed tokens, then the drafts fed so far.
Before proposing, the shadow is brought back in line with what the target accepted: its KV counts only up to
the first draft that differs from the committed sequence, and the blocks past that are given back, as in the
target. Drafts are the draft model's argmax; for sampled requests without a seed they are drawn from its
distribution at the request's temperature instead (better acceptance, and the rejection sampler stays
lossless for any draft distribution). Seeded requests keep greedy drafts so their tokens stay exactly those of
non-speculative sampling with the same seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenfab.attention.backend import KVGroupSpec
from tokenfab.config import EngineConfig
from tokenfab.engine.kv_cache_manager import KVCacheManager
from tokenfab.engine.kv_sizing import sliding_cap
from tokenfab.engine.model_runner import ModelRunner
from tokenfab.engine.speculative.proposer import Proposal, Proposer, StepView
from tokenfab.engine.speculative.rejection import race
from tokenfab.engine.types import Request, ScheduledRequest, StepPlan
from tokenfab.engine.worker import Worker
from tokenfab.models.loading import resolve_model


@dataclass(slots=True)
class _Shadow:
    request: Request
    """The draft's copy: the target's prompt, then its output tokens and the drafts fed after them."""
    synced: int
    """Leading tokens known to equal the target's committed sequence."""


class DraftModelProposer(Proposer):
    name = "draft"

    def __init__(self, runner: ModelRunner, kv: KVCacheManager, max_len: int, seed: int) -> None:
        self.runner = runner
        self.kv = kv
        self.max_len = max_len
        self.generator = torch.Generator().manual_seed(seed)
        self._shadows: dict[str, _Shadow] = {}

    @classmethod
    def build(cls, config: EngineConfig, target) -> DraftModelProposer:
        source = resolve_model(config.speculative.draft_model)
        max_len = min(target.max_model_len, source.arch.max_position_embeddings)
        worker = Worker.load(
            source,
            target.dtype,
            config.resolve_weights()[1],
            target.device,
            max_len,
            config.block_size,
            lambda groups: _draft_blocks(config, groups, target.kv),
            target.backend,
        )
        return cls(worker.runner, worker.kv_manager(config.enable_prefix_caching), max_len, config.seed)

    def rounds(self, k: int) -> int:
        return k

    def forget(self, request_id: str) -> None:
        shadow = self._shadows.pop(request_id, None)
        if shadow is not None:
            self.kv.free(shadow.request)

    def propose(self, step: StepView | None, requests: list[Request], budgets: list[int]) -> list[Proposal]:
        active: dict[str, tuple[Request, int]] = {}
        for request, k in zip(requests, budgets):
            if k and request.num_tokens + k <= self.max_len:
                active[request.request_id] = (request, k)
                self._sync(request)
        drafts: dict[str, list[int]] = {rid: [] for rid in active}
        probs: dict[str, list[torch.Tensor]] = {rid: [] for rid in active}
        for j in range(max((k for _, k in active.values()), default=0)):
            wanted = [rid for rid, (_, k) in active.items() if k > j and len(drafts[rid]) == j]
            self._round(wanted, active, drafts, probs)
        return [self._proposal(drafts.get(r.request_id, []), probs.get(r.request_id, [])) for r in requests]

    def _round(
        self,
        ids: list[str],
        active: dict[str, tuple[Request, int]],
        drafts: dict[str, list[int]],
        probs: dict[str, list[torch.Tensor]],
    ) -> None:
        """One draft forward: each request feeds what its shadow has not computed yet and drafts one token."""
        scheduled = []
        for rid in ids:
            shadow = self._shadows[rid].request
            n = shadow.num_tokens - shadow.num_computed_tokens
            if self.kv.allocate_slots(shadow, n):
                scheduled.append(ScheduledRequest(shadow, shadow.num_computed_tokens, n))
        if not scheduled:
            return
        run = self.runner.execute(StepPlan(scheduled, [], sum(s.num_tokens for s in scheduled)), self.kv.block_tables)
        for row, s in enumerate(run.samplers):
            shadow = s.request
            shadow.num_computed_tokens = s.end
            token, q = self._pick(run.logits[row], active[shadow.request_id][0])
            shadow.output_token_ids.append(token)
            drafts[shadow.request_id].append(token)
            if q is not None:
                probs[shadow.request_id].append(q)

    def _pick(self, logits: torch.Tensor, request: Request) -> tuple[int, torch.Tensor | None]:
        p = request.params
        if p.greedy or p.seed is not None:
            return int(logits.argmax()), None
        q = torch.softmax(logits.float() / p.temperature, dim=-1)
        return race(q, None, self.generator), q

    @staticmethod
    def _proposal(tokens: list[int], probs: list[torch.Tensor]) -> Proposal:
        return Proposal(tokens, torch.stack(probs) if probs and len(probs) == len(tokens) else None)

    def _sync(self, request: Request) -> None:
        """Make the shadow hold the target's committed tokens, keeping the KV of the drafts that were accepted."""
        shadow = self._shadows.get(request.request_id)
        if shadow is None:
            copy = Request(
                request.request_id,
                request.prompt_token_ids,
                request.params,
                request.arrival,
                output_token_ids=list(request.output_token_ids),
            )
            copy.num_computed_tokens = self.kv.get_computed_blocks(copy)
            self._shadows[request.request_id] = _Shadow(copy, copy.num_tokens)
            return
        copy, base = shadow.request, request.num_prompt_tokens
        valid = shadow.synced
        limit = min(copy.num_computed_tokens, request.num_tokens)
        while valid < limit and copy.output_token_ids[valid - base] == request.output_token_ids[valid - base]:
            valid += 1
        del copy.output_token_ids[valid - base :]
        copy.output_token_ids.extend(request.output_token_ids[valid - base :])
        copy.num_computed_tokens = min(copy.num_computed_tokens, valid, request.num_tokens - 1)
        self.kv.rollback(copy)
        self.kv.cache_full_blocks(copy)
        shadow.synced = request.num_tokens


def _draft_blocks(config: EngineConfig, groups: list[KVGroupSpec], target_kv: KVCacheManager) -> list[int]:
    """As many tokens of KV as the target holds, plus room for every sequence's drafts."""
    full = max(
        (p.num_blocks for p, w in zip(target_kv.pools, target_kv.windows) if w is None),
        default=max(p.num_blocks for p in target_kv.pools),
    )
    extra = config.max_num_seqs * (-(-config.speculative.num_speculative_tokens // config.block_size) + 1)
    return [
        full + extra if g.window is None else min(full + extra, sliding_cap(g.window, config) + extra) for g in groups
    ]
