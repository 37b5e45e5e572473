"""Worker: one model's device side — weights, the paged KV cache laid out for its window groups, and the runner
(with its one-call CPU decode step) that executes steps on them.

It is the one place that wires model + KV cache + runner: the engine core's target model, a draft model, and
next a Ray actor, an expert-parallel rank or a prefill/decode role each hold one. Block
bookkeeping stays outside: `kv_manager()` gives the KVCacheManager that matches this cache's pools.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from tokenfab.attention import get_backend
from tokenfab.attention.backend import AttentionBackend, KVCache, KVGroupSpec
from tokenfab.engine.kv_cache_manager import KVCacheManager
from tokenfab.engine.model_runner import ModelRunner, RunOutput
from tokenfab.engine.types import StepPlan
from tokenfab.models.arch import ArchConfig
from tokenfab.models.decoder import DecoderModel
from tokenfab.models.loading import ModelSource, load_model
from tokenfab.quant.plan import QuantPlan

KVAlloc = Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor]
"""Zeroed memory for one KV cache tensor (shape, dtype, device)."""


def kv_groups(arch: ArchConfig) -> list[KVGroupSpec]:
    """One KV group per distinct attention window (None: full attention), with the layers that use it."""
    return [KVGroupSpec(w, tuple(layers)) for w, layers in arch.window_groups.items()]


class Worker:
    def __init__(
        self,
        model: DecoderModel,
        blocks_per_group: list[int],
        block_size: int,
        backend: AttentionBackend | str = "torch",
        kv_alloc: KVAlloc | None = None,
    ) -> None:
        arch = model.arch
        self.model = model
        self.device = model.norm.weight.device
        self.dtype = model.norm.weight.dtype
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        self.groups = kv_groups(arch)
        self.blocks_per_group = blocks_per_group
        self.cache = KVCache(
            self.groups, blocks_per_group, block_size, *arch.kv_cache_layout, self.dtype, self.device, kv_alloc
        )
        self.runner = ModelRunner(model, self.cache, self.backend, self.groups, self.device)

    @classmethod
    def load(
        cls,
        source: ModelSource,
        dtype: torch.dtype,
        weights: QuantPlan | str | None,
        device: torch.device,
        max_model_len: int,
        block_size: int,
        blocks: Callable[[list[KVGroupSpec]], list[int]],
        backend: AttentionBackend | str = "torch",
        kv_alloc: KVAlloc | None = None,
        experts_held: Callable[[int], Sequence[int]] | None = None,
    ) -> Worker:
        """Load a model and give it a KV cache of `blocks(groups)` blocks per window group (in memory from
        `kv_alloc` where given: shared memory a prefill/decode peer reads). `experts_held`: this rank's routed
        experts per MoE layer under expert parallelism."""
        model = load_model(source, dtype, device, max_model_len, weights, experts_held)
        return cls(model, blocks(kv_groups(source.arch)), block_size, backend, kv_alloc)

    @property
    def block_size(self) -> int:
        return self.cache.block_size

    def kv_manager(self, enable_prefix_caching: bool = True, medium: str | None = None) -> KVCacheManager:
        """Block bookkeeping for this cache: one pool per window group, the same block counts."""
        return KVCacheManager(
            [g.window for g in self.groups], self.blocks_per_group, self.block_size, enable_prefix_caching, medium
        )

    def execute(self, plan: StepPlan, block_tables: Callable[[str], tuple[list[int], ...]]) -> RunOutput:
        return self.runner.execute(plan, block_tables)
