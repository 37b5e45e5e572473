"""This engine as one rank of an expert-parallel group (`data_parallel_size` > 1 with `expert_parallel`).

Ranks are engine cores with requests and KV caches of their own (attention data-parallel) whose MoE layers share
one set of experts (tokenfab.models.expert_parallel). They step in lockstep: every rank runs one model pass per
step of the group, a rank without work running only the MoE layers' exchanges (`idle_step`). With EPLB, every
`eplb_interval_steps` steps of the group the ranks add up the tokens each expert received since the last time,
compute the same new placement and load or drop experts to match it before the next step — between two steps, so
service goes on; outputs do not change (see the models module for why).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch

from tokenfab.config import EngineConfig
from tokenfab.models.arch import ArchConfig
from tokenfab.models.decoder import DecoderModel
from tokenfab.models.expert_parallel import ExpertParallel, Placement, rebalance
from tokenfab.models.loading import ModelSource, expert_files, expert_tensors
from tokenfab.quant.plan import QuantPlan

log = logging.getLogger("tokenfab.engine")

MIN_GAIN = 0.02
"""A new placement is applied when it lowers the ranks' max/mean load of the window by at least this much."""


def check_expert_parallel(config: EngineConfig, source: ModelSource) -> None:
    """Refuse expert parallelism the model cannot take, before any rank starts (ValueError says why)."""
    if not config.expert_ranks:
        return
    arch = source.arch
    if not arch.num_experts:
        raise ValueError(f"expert parallelism needs a mixture-of-experts model; {source.path.name} is dense")
    if config.eplb and (source.is_gguf or source.quantization is not None):
        raise ValueError("eplb loads experts from float safetensors; this checkpoint is GGUF or pre-quantized")
    Placement.initial(arch.num_experts, config.data_parallel_size, config.num_redundant_experts)  # divisible?


class ExpertRanks:
    def __init__(self, config: EngineConfig, arch: ArchConfig) -> None:
        """Join the group (blocks until every rank has); the model is loaded after, with `held`."""
        assert config.expert_parallel_master is not None and arch.num_experts
        self.config = config
        self.parallel = ExpertParallel(
            config.expert_parallel_rank, config.data_parallel_size, config.expert_parallel_master, config.torch_device
        )
        self.placement = Placement.initial(arch.num_experts, config.data_parallel_size, config.num_redundant_experts)
        self.placements: list[Placement] = []
        self.steps = 0
        self.step_seconds = 0.0
        """Time in the group's steps, this rank's part (its own or idle), exchanges included."""
        self.rebalances = 0
        self._files: dict[tuple[int, int], list[tuple[Path, str]]] | None = None
        self._seen: torch.Tensor | None = None
        """The experts' token counts at the last rebalancing (the window is what came since)."""

    def held(self, layer: int) -> tuple[int, ...]:
        """The experts this rank loads at start (every MoE layer alike)."""
        return self.placement.ranks[self.parallel.rank]

    def attach(self, model: DecoderModel, source: ModelSource, plan: QuantPlan | None) -> None:
        self.model, self.source, self.plan = model, source, plan
        self.moes = model.moe_layers
        self.layers = [i for i, layer in enumerate(model.decoder_layers) if layer.mlp in self.moes]
        self.placements = [self.placement] * len(self.moes)
        for moe in self.moes:
            moe.place(self.parallel, self.placement)

    @torch.inference_mode()
    def idle_step(self) -> None:
        """This rank's part of a step it has no tokens for."""
        weight = self.model.norm.weight
        empty = torch.empty(0, self.model.arch.hidden_size, dtype=weight.dtype, device=weight.device)
        for moe in self.moes:
            moe(empty)
        self.after_step()

    def after_step(self) -> None:
        self.steps += 1
        interval = self.config.eplb_interval_steps
        if self.config.eplb and self.steps % interval == 0:
            self.rebalance()

    def rank_tokens(self) -> list[int]:
        """Token-expert pairs this rank's experts computed, at its index of a list over the ranks."""
        out = [0] * self.parallel.size
        out[self.parallel.rank] = sum(moe.computed for moe in self.moes)
        return out

    def rebalance(self) -> None:
        """Every rank at once: the window's loads summed over the ranks, a new placement per layer, experts loaded
        and dropped to match."""
        start = time.perf_counter()
        tokens = torch.stack([m.tokens for m in self.moes]).to(self.parallel.device)
        window, self._seen = tokens - (self._seen if self._seen is not None else 0), tokens
        load = self.parallel.sum(window)
        if not int(load.sum()):
            return
        rank, size = self.parallel.rank, self.parallel.size
        plan = self.plan if self.plan is not None else QuantPlan("none")
        changed = 0
        for i, (moe, layer) in enumerate(zip(self.moes, self.layers)):
            counts = load[i].tolist()
            old = self.placements[i]
            new = rebalance(counts, size, self.config.num_redundant_experts)
            if new == old or _rank_imbalance(counts, old) - _rank_imbalance(counts, new) < MIN_GAIN:
                continue  # moving experts costs a pause and their reads; not for noise
            mine, had = set(new.ranks[rank]), {int(e) for e in moe.experts}
            for e in sorted(mine - had):
                self.model.add_expert(layer, e, self._tensors(layer, e), plan)
            for e in had - mine:
                del moe.experts[str(e)]
            moe.place(self.parallel, new)
            self.placements[i] = new
            changed += 1
        if changed:
            self.rebalances += 1
        log.info("expert placement of %d MoE layers rebalanced in %.2f s", changed, time.perf_counter() - start)

    def _tensors(self, layer: int, expert: int) -> list[tuple[str, torch.Tensor]]:
        """One expert's checkpoint tensors (the files indexed once)."""
        if self._files is None:
            self._files = expert_files(self.source)
        return expert_tensors(self._files, layer, expert)

    def close(self) -> None:
        self.parallel.close()


def _rank_imbalance(counts: list[int], placement: Placement) -> float:
    """Max over mean pairs per rank if each expert's tokens split evenly over its copies."""
    hosts = placement.hosts(len(counts))
    per_rank = [0.0] * len(placement.ranks)
    for e, n in enumerate(counts):
        for r in hosts[e]:
            per_rank[r] += n / len(hosts[e])
    total = sum(per_rank)
    return max(per_rank) * len(per_rank) / total if total else 0.0
