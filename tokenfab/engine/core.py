"""EngineCore: the hot loop — schedule, run the model, sample, account, speculate — on token ids only.

It knows nothing of text: detokenization, stop strings and n > 1 grouping happen in the front end
(`OutputProcessor`), in this process for the offline engine or in the API server's process when serving.
Each step's wall time, energy and price are split over the sequences that took part, by tokens processed
(draft tokens under verification included: a request pays for the guesses made for it, and the proposer's time
is inside the step). With speculative decoding a step can emit several tokens per request; only the accepted
ones count as computed, and the KV blocks of rejected drafts are given back.
"""

from __future__ import annotations

import logging
import time

import torch

from tokenfab.attention.backend import KVCache
from tokenfab.config import EngineConfig
from tokenfab.economics.attribution import CostMeter, RequestCost
from tokenfab.engine.expert_ranks import ExpertRanks, check_expert_parallel
from tokenfab.engine.grammar import Grammars
from tokenfab.engine.kv_cache_manager import KVCacheManager
from tokenfab.engine.kv_events import MEDIUM_CPU, MEDIUM_GPU, EventBatch, KVEventPublisher
from tokenfab.engine.kv_sizing import plan_kv_blocks
from tokenfab.engine.kv_tiers import DiskTier, HostTier, KVTiers, TierStore, tier_namespace
from tokenfab.engine.kv_transfer import ExportTable, KVPuller, KVServer, SharedSegments
from tokenfab.engine.messages import CoreInfo, CoreOutput, CoreRequest, EngineStats
from tokenfab.engine.model_runner import RunOutput
from tokenfab.engine.prompt_logprobs import PromptLogprobs
from tokenfab.engine.sampler import Sampler
from tokenfab.engine.scheduler import Emitted, Scheduler, StepUpdate
from tokenfab.engine.speculative.policy import StepShape
from tokenfab.engine.speculative.proposer import StepView
from tokenfab.engine.speculative.speculator import TargetParts, build_speculator
from tokenfab.engine.stats import CostStats, MoEStats, SpecStats, TierStats, TransferStats
from tokenfab.engine.types import Request, RequestStatus, SampleResult, StepPlan
from tokenfab.engine.worker import Worker
from tokenfab.kernels.build import kernel_path
from tokenfab.models.loading import ModelSource, load_tokenizer, resolve_model
from tokenfab.platform import cpu_isa
from tokenfab.platform.power import select_meter
from tokenfab.platform.prices import load_prices
from tokenfab.quant.bf16 import activations_note

log = logging.getLogger("tokenfab.engine")


class EngineCore:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        torch.set_num_threads(config.threads)
        self.source: ModelSource = resolve_model(config.model, prefer_gguf=config.quant_plan.uses("gguf"))
        arch = self.arch = self.source.arch
        self.max_model_len = min(config.max_model_len, arch.max_position_embeddings)
        self.dtype, weight_plan = config.resolve_weights()
        device = config.torch_device
        started = time.monotonic()
        log.info(
            "loading %s on %s (%s, quantization %s)", self.source.path.name, device, self.dtype, config.quantization
        )
        self._segments = SharedSegments() if config.kv_transport == "shm" else None
        check_expert_parallel(config, self.source)
        self.ranks = ExpertRanks(config, arch) if config.expert_ranks else None
        """This engine's rank of an expert-parallel group (None: it holds every expert)."""
        self.worker = Worker.load(
            self.source,
            self.dtype,
            weight_plan,
            device,
            self.max_model_len,
            config.block_size,
            lambda groups: plan_kv_blocks(config, arch, groups, self.dtype, self.max_model_len),
            config.attention_backend,
            self._segments.tensor if self._segments is not None else None,
            self.ranks.held if self.ranks is not None else None,
        )
        self.model = self.worker.model
        if self.ranks is not None:
            self.ranks.attach(self.model, self.source, weight_plan)
        log.info("model loaded in %.1f s", time.monotonic() - started)
        if config.quant_plan.uses("bf16-act"):
            log.info("bf16-act layers take %s", activations_note())
        medium = MEDIUM_CPU if device.type == "cpu" else MEDIUM_GPU
        self.kv = self.worker.kv_manager(config.enable_prefix_caching, medium)
        self.kv_tiers = _kv_tiers(config, self.worker.cache, self._tier_identity())
        if self.kv_tiers is not None:
            self.kv.attach_tiers(self.kv_tiers)
        self.kv_server: KVServer | None = None
        if config.kv_transport is not None:
            exports = ExportTable(config.kv_transfer_timeout_s, config.kv_transport)
            self.kv.attach_transfer(exports, KVPuller(self.worker.cache))
            self.kv_server = KVServer(
                exports, self.worker.cache, config.kv_transport, config.kv_transfer_host, self._segments
            )
            log.info("KV transport %s at %s", config.kv_transport, self.kv_server.endpoint)
        self.scheduler = Scheduler(self.kv, config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len)
        self.kv_events = _kv_event_publisher(config, self.kv, self.scheduler)
        self.sampler = Sampler(config.seed)
        w = self.worker
        self.speculator = build_speculator(
            config,
            TargetParts(
                w.model, self.source, w.cache, w.groups, w.backend, self.kv, self.dtype, device, self.max_model_len
            ),
        )
        self.meter = _cost_meter(config)
        self._costs: dict[str, RequestCost] = {}
        self._prompt_logprobs = PromptLogprobs(self.model)
        self.grammars = Grammars(
            lambda: load_tokenizer(self.source).inner.to_str(), self.arch.vocab_size, list(self.arch.eos_token_ids)
        )
        self._back_to_back = False
        """Whether work was left when the last step ended (the next step's cost then starts where it ended)."""

    @property
    def quantization_label(self) -> str:
        """What the linear layers are stored as, e.g. `int4 (lm_head: int8)` or `checkpoint nvfp4; none`."""
        label = self.config.quant_plan.label
        if self.config.quant_plan.uses("bf16-act"):
            label += f"; bf16-act: {activations_note()}"
        stored = self.source.quantization
        return f"checkpoint {stored.format}; {label}" if stored is not None else label

    # -- requests -----------------------------------------------------------------------------------------------

    def add_request(self, req: CoreRequest) -> None:
        """Queue a sequence; raises ValueError for a prompt the engine can never run."""
        if req.request_id in self.scheduler.requests:
            raise ValueError(f"request id {req.request_id!r} is already in use")
        self.validate_prompt(req.prompt_token_ids + req.output_token_ids)
        eos = tuple(req.eos_token_ids) if req.eos_token_ids is not None else tuple(self.arch.eos_token_ids)
        request = Request(req.request_id, list(req.prompt_token_ids), req.params, req.arrival, req.priority, eos)
        request.output_token_ids = list(req.output_token_ids)
        if req.kv_transfer is not None and (req.kv_transfer.do_remote_decode or req.kv_transfer.do_remote_prefill):
            if self.kv_server is None:
                raise ValueError("kv_transfer_params need a KV transport on this replica (--kv-transport)")
            request.kv_transfer = req.kv_transfer
        leader = self.scheduler.requests.get(req.leader_id) if req.leader_id else None
        self.grammars.add(request)
        self._costs[req.request_id] = RequestCost()
        self.scheduler.add(request, leader=leader)

    def validate_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("prompt is empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"prompt has {len(ids)} tokens; the maximum context length is {self.max_model_len} "
                "(prompt plus at least one generated token)"
            )
        bad = [t for t in ids if not 0 <= t < self.arch.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.arch.vocab_size}): {bad[:5]}")
        if len(ids) > self.kv.capacity_tokens():
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the KV cache capacity {self.kv.capacity_tokens()}")

    def abort(self, request_ids: list[str]) -> None:
        """Finish at once and free their KV blocks; unknown or finished ids are ignored."""
        for request_id in request_ids:
            self.scheduler.abort(request_id)
            self._forget(request_id, finished=True)
            if self.kv.exports is not None:
                self.kv.exports.release(request_id)  # a finished prefill leg nobody will pull
        self._back_to_back = self._back_to_back and self.scheduler.has_unfinished()

    def abort_all(self) -> None:
        """Abort every unfinished request."""
        self.abort(list(self.scheduler.requests))

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def reset_prefix_cache(self) -> None:
        """Forget every cached block hash (announced at once to KV event subscribers)."""
        self.kv.reset_prefix_cache()
        if self.kv_events is not None:
            self.kv_events.publish(EventBatch(time.time(), self.kv.take_events()))

    def tick(self) -> bool:
        """Upkeep between steps, also while idle: free the blocks of prefill legs their decode replicas released
        (or that timed out); whether any were freed."""
        return self.kv.settle_exports() > 0

    @property
    def holds_exports(self) -> bool:
        """Whether prefill legs' KV is held for decode replicas."""
        return self.kv.exports is not None and bool(self.kv.exports.held())

    def close(self) -> None:
        """Stop publishing and serving KV, finish the disk tier's writes (the model itself needs no teardown)."""
        if self.kv_server is not None:
            self.kv_server.close()
            assert self.kv.puller is not None
            self.kv.puller.close()
            self.kv_server = None
        if self._segments is not None:
            self._segments.close()
        if self.kv_tiers is not None:
            self.kv_tiers.close()
        if self.kv_events is not None:
            self.kv_events.flush()
            self.kv_events.close()
            self.kv_events = None
        if self.ranks is not None:
            self.ranks.close()
            self.ranks = None

    # -- stepping -----------------------------------------------------------------------------------------------

    def step(self) -> list[CoreOutput]:
        self.tick()
        if self._back_to_back:
            self.meter.continue_step()
        else:
            self.meter.begin_step()
        start = time.perf_counter()
        plan = self.scheduler.schedule()
        for request in plan.preempted:
            self._forget(request.request_id, finished=False)
        if plan.empty:
            self.meter.end_step({})
            self._back_to_back = False
            if self.ranks is not None:
                self.ranks.idle_step()  # the other ranks' MoE layers wait for this one's
            return []
        self.grammars.prepare(plan.scheduled)
        executed = time.perf_counter()
        run = self.worker.execute(plan, self.kv.block_tables)
        self._prompt_logprobs.collect(plan, run)
        self.grammars.mask(run.logits, run.samplers)
        result = self.sampler(
            run.logits,
            [s.request for s in run.samplers],
            [s.spec_token_ids for s in run.samplers],
            [s.spec_probs for s in run.samplers],
        )
        self.grammars.advance(run.samplers, result)
        update = self.scheduler.update(plan, run.samplers, result)
        if self.kv_tiers is not None:
            prefill = sum(s.num_tokens for s in plan.scheduled if s.num_tokens > 1)
            self.kv_tiers.observe_step(prefill, plan.num_batched_tokens, time.perf_counter() - executed)
        if self.speculator is not None:
            self._speculate(plan, run, result, time.perf_counter() - start)
        for part_id, part in self.meter.end_step({s.request.request_id: s.num_tokens for s in plan.scheduled}).items():
            self._costs[part_id].add(part)
        outputs = [self._output(e) for e in update.emitted]
        self._back_to_back = self.scheduler.has_unfinished()
        if self.ranks is not None:
            self.ranks.after_step()
        return outputs

    def group_step(self) -> list[CoreOutput] | None:
        """Expert parallelism: one step of the group — this rank's own if it has work, else its idle part — when
        any rank has work; None when none has (every rank calls this at the same point)."""
        assert self.ranks is not None
        if not self.ranks.parallel.any(self.has_unfinished()):
            return None
        start = time.perf_counter()
        if self.has_unfinished():
            outputs = self.step()
        else:
            self.ranks.idle_step()
            outputs = []
        self.ranks.step_seconds += time.perf_counter() - start
        return outputs

    def _speculate(self, plan: StepPlan, run: RunOutput, result: SampleResult, seconds: float) -> None:
        assert self.speculator is not None
        accepted = {s.request.request_id: n for s, n in zip(run.samplers, result.num_accepted)}
        shape = StepShape(
            plan.num_batched_tokens, int(run.logits.shape[0]), sum(s.num_tokens > 1 for s in plan.scheduled)
        )
        self.speculator.record(plan.scheduled, accepted, shape, seconds)
        decoding = [s.request for s in run.samplers if not s.request.finished]
        self.speculator.propose(
            StepView(plan, run), decoding, self.scheduler.running, self.config.max_num_batched_tokens
        )

    def _output(self, e: Emitted) -> CoreOutput:
        request = e.request
        total = self._costs[request.request_id]
        cost = RequestCost(total.usd, total.joules, total.device_seconds)
        prompt_logprobs = self._prompt_logprobs.take(request)
        if e.status is not None:
            self._forget(request.request_id, finished=True)
        transfer = None
        held = e.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
        if held and request.kv_transfer is not None and request.kv_transfer.do_remote_decode:
            assert self.kv_server is not None  # add_request refuses the params without one
            transfer = self.kv_server.params(request.request_id, request.num_prompt_tokens // self.config.block_size)
        return CoreOutput(
            request.request_id,
            e.token_ids,
            e.logprobs,
            e.status.value if e.status is not None else None,
            request.stop_reason,
            request.num_cached_tokens,
            request.first_scheduled,
            cost,
            prompt_logprobs=prompt_logprobs,
            kv_transfer=transfer,
        )

    def _forget(self, request_id: str, finished: bool) -> None:
        self._prompt_logprobs.forget(request_id, finished)
        if finished:
            self.grammars.forget(request_id)
            self.sampler.forget(request_id)
            self._costs.pop(request_id, None)
        if self.speculator is not None:
            self.speculator.forget(request_id, finished)

    # -- observation --------------------------------------------------------------------------------------------

    def info(self) -> CoreInfo:
        """What a front end needs to know about this core: limits, model, prices, kernels."""
        prices = self.meter.prices
        path = kernel_path()
        return CoreInfo(
            model_path=str(self.source.path),
            max_model_len=self.max_model_len,
            vocab_size=self.arch.vocab_size,
            kv_capacity_tokens=self.kv.capacity_tokens(),
            max_num_seqs=self.config.max_num_seqs,
            max_num_batched_tokens=self.config.max_num_batched_tokens,
            dtype=str(self.dtype).replace("torch.", ""),
            energy_source=self.meter.energy_source,
            meter=self.meter.meter_name,
            usd_per_hour=prices.usd_per_second * 3600,
            usd_per_kwh=prices.usd_per_kwh,
            quantization=self.quantization_label,
            weight_bytes=self.model.weight_bytes_per_token(),
            kernel_isa=path.level or "torch",
            kernel_isa_reason=path.reason,
            cpu_flags=cpu_isa.vector_flags(),
            batch_invariant=self.config.batch_invariant,
            block_size=self.config.block_size,
            kv_events_endpoint=self.kv_events.endpoint if self.kv_events is not None else None,
            kv_events_replay_endpoint=self.kv_events.replay_endpoint if self.kv_events is not None else None,
            kv_transport=self.config.kv_transport,
            kv_transfer_endpoint=self.kv_server.endpoint if self.kv_server is not None else None,
        )

    def stats(self) -> EngineStats:
        m = self.meter
        spec = self.speculator.stats() if self.speculator is not None else SpecStats()
        return EngineStats(
            time.monotonic(),
            self.scheduler.stats(),
            self.kv.kv_stats(),
            self.kv.prefix_stats(),
            spec,
            CostStats(m.busy_seconds, m.joules, m.usd, m.energy_source, m.meter_name),
            self.kv_tiers.snapshot() if self.kv_tiers is not None else TierStats(),
            self.kv.exports.snapshot() if self.kv.exports is not None else TransferStats(),
            self._moe_stats(),
        )

    def _moe_stats(self) -> MoEStats:
        """The experts' token counts since start."""
        tokens = self.model.expert_tokens()
        if tokens is None:
            return MoEStats()
        if self.ranks is None:
            return MoEStats(tokens.tolist())
        rebalances = self.ranks.rebalances if self.ranks.parallel.rank == 0 else 0  # the group's, counted once
        return MoEStats(
            tokens.tolist(),
            self.ranks.rank_tokens(),
            rebalances,
            self.ranks.parallel.exchange_seconds,
            self.ranks.step_seconds,
        )

    def _tier_identity(self) -> tuple:
        """What a disk tier's blocks depend on besides their tokens: model files, weight format, dtype, KV layout."""
        path = self.source.path
        files = sorted(path.iterdir()) if path.is_dir() else [path]
        return (
            path.name,
            [(f.name, f.stat().st_size) for f in files if f.is_file()],
            self.quantization_label,
            str(self.dtype),
            self.config.block_size,
            [(g.window, g.layers) for g in self.worker.groups],
            self.arch.kv_cache_layout,
        )


def _kv_tiers(config: EngineConfig, cache: KVCache, identity: tuple) -> KVTiers | None:
    """The host and disk tiers the config asks for (None: neither)."""
    if not config.kv_tiers:
        return None
    stores: list[TierStore] = []
    if config.kv_host_gb > 0:
        host = HostTier.for_cache(cache, config.kv_host_gb * 2**30)
        stores.append(host)
        log.info("KV host tier: %.2f GiB, %s blocks per group", config.kv_host_gb, host.slots)
    if config.kv_disk_dir is not None:
        disk = DiskTier(config.kv_disk_dir, tier_namespace(*identity), int(config.kv_disk_gb * 2**30))
        stores.append(disk)
        log.info("KV disk tier: %s (%.1f GiB; %d blocks found)", disk.dir, config.kv_disk_gb, disk.num_blocks)
    return KVTiers(cache, stores, config.kv_write_through_hits)


def _kv_event_publisher(config: EngineConfig, kv: KVCacheManager, scheduler: Scheduler) -> KVEventPublisher | None:
    """Publish each step's KV events when an endpoint is configured (nothing is recorded otherwise)."""
    if config.kv_events_endpoint is None:
        return None
    publisher = KVEventPublisher(config.kv_events_endpoint, config.kv_events_replay_endpoint, config.kv_events_topic)
    kv.record_events()

    def publish(update: StepUpdate) -> None:
        if update.kv_events:
            publisher.publish(EventBatch(time.time(), update.kv_events))

    scheduler.hooks.append(publish)
    return publisher


def _cost_meter(config: EngineConfig) -> CostMeter:
    p = config.pricing
    cores = config.threads if config.torch_device.type == "cpu" else 1
    prices = load_prices(
        p.profile,
        config.device,
        cores,
        p.prices_file,
        usd_per_hour=p.usd_per_hour,
        usd_per_kwh=p.usd_per_kwh,
        idle_watts=p.idle_watts,
        peak_watts=p.peak_watts,
    )
    return CostMeter(select_meter(config.device, prices.device, cores), prices)
