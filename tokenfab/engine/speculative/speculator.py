"""Speculator: the engine's side of speculative decoding — after each step, record how the drafts fared, ask the
policy how many drafts each decoding request should get, and have the proposer fill them in.

The drafts are stored on the requests (`spec_token_ids`); the scheduler gives them token slots next step, the
runner computes their logits in the same forward as everything else, and the sampler verifies them.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import msgspec
import torch

from tokenfab.attention.backend import AttentionBackend, KVCache, KVGroupSpec
from tokenfab.config import EngineConfig
from tokenfab.engine.kv_cache_manager import KVCacheManager
from tokenfab.engine.speculative.policy import AdaptivePolicy, Candidate, CostModel, PolicyConfig, StepShape
from tokenfab.engine.speculative.proposer import Proposer, StepView
from tokenfab.engine.stats import SpecStats
from tokenfab.engine.types import Request, ScheduledRequest
from tokenfab.models.decoder import DecoderModel
from tokenfab.models.loading import ModelSource, resolve_model


@dataclass(slots=True)
class TargetParts:
    """What proposers may build on: the target model, its KV cache and attention backend."""

    model: DecoderModel
    source: ModelSource
    cache: KVCache
    groups: list[KVGroupSpec]
    backend: AttentionBackend
    kv: KVCacheManager
    dtype: torch.dtype
    device: torch.device
    max_model_len: int


class Speculator:
    def stats(self) -> SpecStats:
        return msgspec.structs.replace(self.counters)

    def __init__(self, proposer: Proposer, policy: AdaptivePolicy, max_k: int, max_model_len: int) -> None:
        self.proposer = proposer
        self.policy = policy
        self.max_k = max_k
        self.max_model_len = max_model_len
        self.counters = SpecStats(proposer.name)
        self._pass_seconds = 0.0
        """Measured seconds per proposer pass (exponentially weighted)."""

    def record(
        self, scheduled: list[ScheduledRequest], accepted: dict[str, int], shape: StepShape, seconds: float
    ) -> None:
        """After verification: acceptance per request, and the step's cost for the policy's model."""
        on = False
        for s in scheduled:
            if s.num_spec:
                on = True
                n = accepted.get(s.request.request_id, 0)
                self.policy.record(s.request.request_id, s.num_spec, n)
                self.counters.proposed_tokens += s.num_spec
                self.counters.accepted_tokens += n
                self.counters.verified_seqs += 1
        if on:
            self.counters.steps_on += 1
        elif accepted:
            self.counters.steps_off += 1
        self.policy.cost.observe(shape, seconds)

    def propose(self, step: StepView, decoding: list[Request], running: list[Request], budget: int) -> None:
        """Drafts for the requests that sampled this step and run on (`decoding`)."""
        start = time.perf_counter()
        caps = [self._cap(r) for r in decoding]
        early = self.proposer.propose(step, decoding, caps) if self.proposer.cheap else None
        if early is not None:
            caps = [len(p.token_ids) for p in early]
        candidates = [Candidate(r.request_id, cap) for r, cap in zip(decoding, caps)]
        choice = self.policy.choose(candidates, _next_shape(running, budget), self._pass_seconds, self.proposer.rounds)
        self.counters.probes += choice.probes
        proposals = early if early is not None else self.proposer.propose(step, decoding, choice.ks)
        for request, k, proposal in zip(decoding, choice.ks, proposals):
            request.spec_token_ids = proposal.token_ids[:k]
            request.spec_probs = None if proposal.probs is None else proposal.probs[:k]
        elapsed = time.perf_counter() - start
        self.counters.draft_seconds += elapsed
        passes = self.proposer.rounds(max(choice.ks, default=0))
        if passes:
            per_pass = elapsed / passes
            self._pass_seconds = per_pass if not self._pass_seconds else 0.8 * self._pass_seconds + 0.2 * per_pass

    def forget(self, request_id: str, finished: bool) -> None:
        self.proposer.forget(request_id)
        if finished:
            self.policy.forget(request_id)

    def _cap(self, request: Request) -> int:
        p = request.params
        left = min(p.max_tokens - request.num_output_tokens - 1, self.max_model_len - request.num_tokens)
        return max(0, min(self.max_k, left, self.proposer.max_proposal))


def _next_shape(running: list[Request], budget: int) -> StepShape:
    """The next step as the scheduler will plan it without drafts (new admissions aside)."""
    tokens = rows = multi = 0
    for r in running:
        n = min(r.num_tokens - r.num_computed_tokens, budget - tokens)
        if n <= 0:
            break
        tokens += n
        rows += r.num_computed_tokens + n == r.num_tokens
        multi += n > 1
    return StepShape(tokens, rows, multi)


def build_speculator(config: EngineConfig, target: TargetParts) -> Speculator | None:
    spec = config.speculative
    if not spec.enabled:
        return None
    proposer = _build_proposer(config, target)
    policy = AdaptivePolicy(PolicyConfig(spec.num_speculative_tokens, spec.adaptive), CostModel(_prior(target)))
    return Speculator(proposer, policy, spec.num_speculative_tokens, target.max_model_len)


def check_speculative(config: EngineConfig, source: ModelSource) -> None:
    """Refuse a speculative method the model cannot use, before anything is loaded (ValueError says why)."""
    spec = config.speculative
    if spec.method == "mtp" and source.arch.num_mtp_layers == 0:
        raise ValueError(
            f"{source.path} ships no MTP modules (num_nextn_predict_layers); use --speculative ngram or draft:<model>"
        )
    if spec.method == "draft":
        draft = resolve_model(spec.draft_model)
        if draft.arch.vocab_size != source.arch.vocab_size:
            raise ValueError(
                f"the draft model's vocabulary ({draft.arch.vocab_size}) differs from the target's "
                f"({source.arch.vocab_size}); a draft must share the target's tokenizer"
            )


def _build_proposer(config: EngineConfig, target: TargetParts) -> Proposer:
    spec = config.speculative
    check_speculative(config, target.source)
    if spec.method == "ngram":
        from tokenfab.engine.speculative.ngram import NgramProposer

        return NgramProposer(spec.ngram_min, spec.ngram_max)
    if spec.method == "draft":
        from tokenfab.engine.speculative.draft import DraftModelProposer

        return DraftModelProposer.build(config, target)
    if spec.method == "mtp":
        from tokenfab.engine.speculative.mtp import MTPProposer

        return MTPProposer.build(config, target)
    raise ValueError(f"unknown speculative method {spec.method!r}")


def _prior(target: TargetParts) -> tuple[float, float, float, float]:
    """Step-cost prior (seconds) from the model's size, at a guessed 20 GB/s and 200 GFLOP/s; measured steps
    replace it within a few dozen steps."""
    arch = target.model.arch
    head = 2.0 * arch.vocab_size * arch.hidden_size
    body = max(arch.flops_per_token(0) - head, 0.0)
    return (target.model.weight_bytes_per_token() / 20e9, body / 200e9, head / 200e9, arch.num_layers * 2e-5)
