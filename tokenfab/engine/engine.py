"""LLMEngine: owns the model, KV cache, scheduler, runner, sampler and output processor; one step at a time."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import torch

from tokenfab.attention import get_backend
from tokenfab.attention.backend import KVCache, KVGroupSpec
from tokenfab.config import EngineConfig
from tokenfab.engine.kv_cache_manager import KVCacheManager
from tokenfab.engine.kv_sizing import plan_kv_blocks
from tokenfab.engine.model_runner import ModelRunner
from tokenfab.engine.output_processor import OutputProcessor
from tokenfab.engine.sampler import Sampler
from tokenfab.engine.scheduler import Scheduler
from tokenfab.engine.types import Request, RequestOutput, RequestStatus, SamplingParams, StepPlan
from tokenfab.models.loading import ModelSource, load_model, load_tokenizer, resolve_model


@dataclass(slots=True)
class EngineCounters:
    """Monotonic counters read by tests, benchmarks and metrics."""

    steps: int = 0
    prompt_tokens_computed: int = 0
    """Prompt tokens that went through the model (prefix-cache hits excluded)."""
    tokens_computed: int = 0
    generated_tokens: int = 0


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.set_num_threads(config.threads)
        self.source: ModelSource = resolve_model(config.model)
        arch = self.arch = self.source.arch
        self.tokenizer = load_tokenizer(self.source)
        self.max_model_len = min(config.max_model_len, arch.max_position_embeddings)
        self.dtype = config.resolve_dtype()
        device = config.torch_device
        self.model = load_model(self.source, self.dtype, device, self.max_model_len, config.pack_weights)
        groups = [KVGroupSpec(w, tuple(layers)) for w, layers in arch.window_groups.items()]
        blocks = plan_kv_blocks(config, arch, groups, self.dtype, self.max_model_len)
        self.cache = KVCache(groups, blocks, config.block_size, arch.num_kv_heads, arch.head_dim, self.dtype, device)
        self.kv = KVCacheManager([g.window for g in groups], blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens)
        self.runner = ModelRunner(self.model, self.cache, get_backend(config.attention_backend), groups, device)
        self.sampler = Sampler(config.seed)
        self.outputs = OutputProcessor(self.tokenizer)
        self.counters = EngineCounters()
        self._ids = itertools.count()

    # -- requests -----------------------------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                    priority: int = 0) -> str:
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.outputs.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        self._validate_prompt(ids)
        now = time.monotonic()
        children = [self._child(request_id, i, ids, params, now, priority) for i in range(params.n)]
        self.outputs.add_group(request_id, text, children)
        for child in children:
            self.scheduler.add(child, leader=children[0] if child is not children[0] else None)
        return request_id

    def _validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt has {len(ids)} tokens; the maximum context length is {self.max_model_len} "
                             "(prompt plus at least one generated token)")
        bad = [t for t in ids if not 0 <= t < self.arch.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.arch.vocab_size}): {bad[:5]}")
        if len(ids) > self.kv.capacity_tokens():
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the KV cache capacity {self.kv.capacity_tokens()}")

    def _child(self, request_id: str, index: int, ids: list[int], params: SamplingParams, now: float,
               priority: int) -> Request:
        child_params = params
        if params.n > 1:
            # Siblings draw different samples; with a seed, sibling i uses seed + i.
            seed = None if params.seed is None else params.seed + index
            child_params = SamplingParams(**{**_fields(params), "n": 1, "seed": seed})
        child_id = request_id if params.n == 1 else f"{request_id}#{index}"
        eos = self.tokenizer.eos_token_ids or self.arch.eos_token_ids
        return Request(child_id, list(ids), child_params, now, priority, tuple(eos))

    def abort_request(self, request_id: str) -> None:
        for child in self.outputs.children(request_id):
            self.scheduler.abort(child.request_id)
            self.sampler.forget(child.request_id)
        group = self.outputs.groups.get(request_id)
        if group is not None:
            self.outputs.drop_finished(group)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # -- stepping -----------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        plan = self.scheduler.schedule()
        if plan.empty:
            return []
        samplers, logits = self.runner.execute(plan, self.kv.block_tables)
        result = self.sampler(logits, [s.request for s in samplers])
        new_tokens = self._update(plan, [s.request for s in samplers], result.token_ids, result.logprobs)
        stopped, groups = self.outputs.process(new_tokens)
        for request in stopped:
            self._finish(request, RequestStatus.FINISHED_STOPPED)
        outputs = [self.outputs.make_output(g) for g in groups]
        for g in groups:
            self.outputs.drop_finished(g)
        return outputs

    def _update(self, plan: StepPlan, requests: list[Request], tokens: list[int], logprobs: list) -> dict[str, list[int]]:
        self.counters.steps += 1
        self.counters.tokens_computed += plan.num_batched_tokens
        for s in plan.scheduled:
            request = s.request
            self.counters.prompt_tokens_computed += max(0, min(s.end, request.num_prompt_tokens) - s.start)
            request.num_computed_tokens = s.end
            self.kv.cache_full_blocks(request)
        new_tokens: dict[str, list[int]] = {}
        now = time.monotonic()
        for request, token, lp in zip(requests, tokens, logprobs):
            request.output_token_ids.append(token)
            if lp is not None:
                request.output_logprobs.append(lp)
            if request.first_token_time is None:
                request.first_token_time = now
            self.counters.generated_tokens += 1
            new_tokens[request.request_id] = [token]
            status = self._stop_status(request, token)
            if status is not None:
                self._finish(request, status)
        return new_tokens

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

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.scheduler.finish(request, status)
        self.sampler.forget(request.request_id)


def _fields(params: SamplingParams) -> dict:
    return {name: getattr(params, name) for name in SamplingParams.__slots__}
