"""Worker: one model's device side — weights, the paged KV cache laid out for its window groups, and the runner
(with its one-call CPU decode step) that executes steps on them.

It is the one place that wires model + KV cache + runner: the engine core's target model, a draft model, the
evaluation scorer, and next a Ray actor, an expert-parallel rank or a prefill/decode role each hold one. Block
bookkeeping stays outside: `kv_manager()` gives the KVCacheManager that matches this cache's pools.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenfab.attention import get_backend
from tokenfab.attention.backend import (
    AttentionBackend,
    ForwardContext,
    KVCache,
    KVGroupSpec,
    SeqLayout,
    forward_context,
)
from tokenfab.engine.kv_cache_manager import KVCacheManager
from tokenfab.engine.model_runner import ModelRunner, RunOutput
from tokenfab.engine.types import StepPlan
from tokenfab.models.arch import ArchConfig
from tokenfab.models.decoder import DecoderModel
from tokenfab.models.loading import ModelSource, load_model
from tokenfab.quant.plan import QuantPlan


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
    ) -> None:
        arch = model.arch
        self.model = model
        self.device = model.norm.weight.device
        self.dtype = model.norm.weight.dtype
        self.backend = get_backend(backend) if isinstance(backend, str) else backend
        self.groups = kv_groups(arch)
        self.blocks_per_group = blocks_per_group
        self.cache = KVCache(
            self.groups, blocks_per_group, block_size, arch.num_kv_heads, arch.head_dim, self.dtype, self.device
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
    ) -> Worker:
        """Load a model and give it a KV cache of `blocks(groups)` blocks per window group."""
        model = load_model(source, dtype, device, max_model_len, weights)
        return cls(model, blocks(kv_groups(source.arch)), block_size, backend)

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

    @torch.inference_mode()
    def hidden_states(self, ids: list[int]) -> torch.Tensor:
        """Final hidden states [T, hidden] of one sequence prefilled from position 0 into blocks 1, 2, ... (the
        cache must hold them: see `for_sequence`)."""
        table = list(range(1, -(-len(ids) // self.block_size) + 1))
        layout = SeqLayout(0, len(ids), 0, tuple(table for _ in self.groups))
        metadata = self.backend.build_metadata([layout], self.groups, self.block_size, self.device)
        with forward_context(ForwardContext(self.backend, metadata, self.cache)):
            return self.model(torch.tensor(ids, device=self.device), torch.arange(len(ids), device=self.device))

    @classmethod
    def for_sequence(cls, model: DecoderModel, num_tokens: int, block_size: int = 16) -> Worker:
        """A worker whose cache holds exactly one sequence of num_tokens (scoring, calibration)."""
        blocks = -(-num_tokens // block_size) + 1  # + the null block, which no table uses
        return cls(model, [blocks] * len(model.arch.window_groups), block_size)
