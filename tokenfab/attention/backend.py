"""Attention backend interface, the per-step sequence layout it consumes, and the scoped forward context."""

from __future__ import annotations

import abc
import contextlib
import contextvars
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class SeqLayout:
    """One request's slice of a flat token batch."""

    token_start: int
    """Index of its first token in the flat batch."""
    num_tokens: int
    context_start: int
    """Position of its first token (= tokens already in the KV cache)."""
    block_tables: tuple[list[int], ...]
    """Block ids per KV group (window group), covering positions [0, context_start + num_tokens)."""

    @property
    def context_end(self) -> int:
        return self.context_start + self.num_tokens


@dataclass(frozen=True, slots=True)
class KVGroupSpec:
    """Layers that share a sliding window share one KV pool."""

    window: int | None
    layers: tuple[int, ...]


class KVCache:
    """Per-group K and V tensors: [layers_in_group, num_blocks * block_size, kv_heads, head_dim]."""

    def __init__(
        self,
        groups: list[KVGroupSpec],
        blocks_per_group: list[int],
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        alloc: Callable[[tuple[int, ...], torch.dtype, torch.device], torch.Tensor] | None = None,
    ) -> None:
        """`alloc(shape, dtype, device)` gives each tensor zeroed memory of its own (shared memory that a peer
        maps, for the shm KV transport); by default torch.zeros."""
        self.groups = groups
        self.block_size = block_size
        self.blocks_per_group = blocks_per_group
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.layer_slot: dict[int, tuple[int, int]] = {}
        for g, (spec, blocks) in enumerate(zip(groups, blocks_per_group)):
            shape = (len(spec.layers), blocks * block_size, kv_heads, head_dim)
            # Zeros, not empty: padded gathers read the null block, and NaN garbage would survive a 0 weight.
            make = alloc or (lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device))
            self.k.append(make(shape, dtype, device))
            self.v.append(make(shape, dtype, device))
            for i, layer in enumerate(spec.layers):
                self.layer_slot[layer] = (g, i)

    def block(self, group: int, block_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of one block's K and V in a group: [layers_in_group, block_size, kv_heads, head_dim] each."""
        rows = slice(block_id * self.block_size, (block_id + 1) * self.block_size)
        return self.k[group][:, rows], self.v[group][:, rows]

    def write_block(self, group: int, block_id: int, kv: torch.Tensor) -> None:
        """Copy a block's KV ([2, layers_in_group, block_size, kv_heads, head_dim]) into a pool block."""
        k, v = self.block(group, block_id)
        k.copy_(kv[0])
        v.copy_(kv[1])

    @staticmethod
    def bytes_per_block(num_layers: int, block_size: int, kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
        return 2 * num_layers * block_size * kv_heads * head_dim * torch.tensor([], dtype=dtype).element_size()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


@dataclass(frozen=True, slots=True)
class HeadLayout:
    """A layer's heads as its fused qkv projection lays them out per token: `heads` query heads, then `kv_heads`
    key heads and `kv_heads` value heads, `head_dim` each. `eps` is the q/k norms' (where the model has them)."""

    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    eps: float


class AttentionMetadata:
    """A backend's per-step metadata (block indices, masks, slot mappings): built once per step by
    `build_metadata`, read by every layer. Each backend subclasses it."""


class AttentionBackend(abc.ABC):
    """Computes attention over a flat batch of mixed prefill and decode tokens against the paged KV cache."""

    @abc.abstractmethod
    def build_metadata(
        self, seqs: list[SeqLayout], groups: list[KVGroupSpec], block_size: int, device: torch.device
    ) -> AttentionMetadata:
        """Everything the layers need for one step, computed once and shared by all layers."""

    @abc.abstractmethod
    def forward(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        scale: float,
        metadata: AttentionMetadata,
        cache: KVCache,
    ) -> torch.Tensor:
        """q: [T, H, D]; k, v: [T, KVH, D] of this step's tokens. Writes k, v to the cache; returns [T, H, D]."""

    def forward_latent(
        self,
        layer: int,
        q: torch.Tensor,
        latent: torch.Tensor,
        value_dim: int,
        scale: float,
        metadata: AttentionMetadata,
        cache: KVCache,
    ) -> torch.Tensor:
        """Latent attention (MLA, absorbed; see tokenfab.models.mla): q [T, H, E] against one key head whose keys
        are each token's latent [T, E] and whose values are the latent's first `value_dim` features. Writes the
        step's latents to the cache (split across its K and V halves); returns [T, H, value_dim]."""
        raise NotImplementedError(f"the {type(self).__name__} attention backend has no latent (MLA) attention")

    def forward_qkv(
        self,
        layer: int,
        qkv: torch.Tensor,
        layout: HeadLayout,
        qk_norms: tuple[torch.Tensor, torch.Tensor] | None,
        rope: tuple[torch.Tensor, torch.Tensor],
        metadata: AttentionMetadata,
        cache: KVCache,
    ) -> torch.Tensor | None:
        """All of attention from the fused projection qkv [T, (H + 2 KVH) * D]: q/k RMSNorm (weights `qk_norms`),
        rotary (cos, sin [T, 1, D]), the cache write and attention, in one step -> [T, H, D]; or None where the
        backend has no such path for this step (the caller then does the parts and calls `forward`). qkv may be
        modified in place."""
        return None


@dataclass(slots=True)
class ForwardContext:
    backend: AttentionBackend
    metadata: AttentionMetadata
    cache: KVCache


_CONTEXT: contextvars.ContextVar[ForwardContext | None] = contextvars.ContextVar("tokenfab_forward", default=None)


@contextlib.contextmanager
def forward_context(ctx: ForwardContext) -> Iterator[None]:
    """Scope the step's attention metadata to one model forward; nesting is a bug."""
    if _CONTEXT.get() is not None:
        raise RuntimeError("forward_context is already active; nested model forwards are not supported")
    token = _CONTEXT.set(ctx)
    try:
        yield
    finally:
        _CONTEXT.reset(token)


def current_forward_context() -> ForwardContext:
    ctx = _CONTEXT.get()
    if ctx is None:
        raise RuntimeError("attention called outside forward_context")
    return ctx
