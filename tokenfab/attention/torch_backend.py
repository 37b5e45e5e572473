"""Attention on torch's SDPA: single-token (decode) sequences batched with padding, longer chunks one by one.

Decode rows are laid out as [batch, kv_heads, group, dim] against keys [batch, kv_heads, ctx, dim], so grouped
query heads never need their K/V repeated. Sliding-window groups gather only the keys inside the window. On CPUs
with the C++ kernels, decodes and prefill chunks read K/V in place from the paged cache instead (tokenfab.kernels):
every query token is computed on its own over its own span, so a prompt's attention does not depend on how it was
chunked, nor a decode's on the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from tokenfab.attention.backend import AttentionBackend, AttentionMetadata, HeadLayout, KVCache, KVGroupSpec, SeqLayout
from tokenfab.kernels import cpu as kernels


@dataclass(slots=True)
class PrefillSlice:
    """One prefill chunk of one window group. Which path reads it (the paged CPU kernel, or SDPA over gathered keys)
    depends on the cache, so each path's metadata is built the first time a layer asks for it, once per step."""

    token_start: int
    token_end: int
    seq: SeqLayout
    group: int
    window: int | None
    block_size: int
    device: torch.device
    _sdpa: tuple[torch.Tensor, torch.Tensor | None] | None = None
    _paged: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def sdpa(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Cache slots of the keys this chunk attends to, and the [q, keys] bool mask (None when plain causal over
        exactly this chunk's keys)."""
        if self._sdpa is None:
            self._sdpa = _sdpa_keys(self.seq, self.group, self.window, self.block_size, self.device)
        return self._sdpa

    def paged(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For the CPU kernel: the chunk's block ids and each query's [lo, hi) positions in them (int32)."""
        if self._paged is None:
            self._paged = _paged_queries(self.seq, self.group, self.window, self.block_size)
        return self._paged


@dataclass(slots=True)
class GroupMetadata:
    slot_mapping: torch.Tensor
    num_decodes: int
    decode_index: torch.Tensor | None
    """[decodes, max_blocks] block ids (padded with the null block)."""
    decode_mask: torch.Tensor | None
    """[decodes, 1, 1, max_blocks * block_size] bool."""
    decode_span: tuple[torch.Tensor, torch.Tensor] | None
    """[decodes] int32 first and end position each decode attends to, relative to its first block in the index."""
    prefills: list[PrefillSlice]


@dataclass(slots=True)
class TorchMetadata(AttentionMetadata):
    groups: list[GroupMetadata]


def _slots(block_table: list[int], start: int, end: int, block_size: int) -> np.ndarray:
    pos = np.arange(start, end, dtype=np.int64)
    table = np.asarray(block_table, dtype=np.int64)
    return table[pos // block_size] * block_size + pos % block_size


def _key_start(seq: SeqLayout, window: int | None) -> int:
    """First position any of this chunk's queries may see."""
    return 0 if window is None else max(0, seq.context_start - window + 1)


def _first_block(seq: SeqLayout, window: int | None, block_size: int) -> int:
    """First block of the kernels' block index: the key start's block, rounded down to a multiple of
    ATTENTION_PART positions (blocks before the key start are never read)."""
    return _key_start(seq, window) // kernels.ATTENTION_PART * kernels.ATTENTION_PART // block_size


def _decode_metadata(
    seqs: list[SeqLayout], g: int, window: int | None, block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Whole blocks per sequence (a block is one contiguous copy), a mask of the positions that count, and the
    same positions as [lo, hi) spans."""
    spans = [(_first_block(s, window, block_size), -(-s.context_end // block_size)) for s in seqs]
    width = max(end - start for start, end in spans)
    index = np.zeros((len(seqs), width), dtype=np.int64)
    mask = np.zeros((len(seqs), width * block_size), dtype=bool)
    lo = np.zeros(len(seqs), dtype=np.int32)
    hi = np.zeros(len(seqs), dtype=np.int32)
    for row, (seq, (first, last)) in enumerate(zip(seqs, spans)):
        index[row, : last - first] = seq.block_tables[g][first:last]
        lo[row] = _key_start(seq, window) - first * block_size
        hi[row] = seq.context_end - first * block_size
        mask[row, lo[row] : hi[row]] = True
    return (
        torch.from_numpy(index).to(device),
        torch.from_numpy(mask).view(len(seqs), 1, 1, width * block_size).to(device),
        (torch.from_numpy(lo).to(device), torch.from_numpy(hi).to(device)),
    )


def _paged_queries(
    seq: SeqLayout, g: int, window: int | None, block_size: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk's queries as single-token sequences for the paged kernel: each attends to [its window start, its
    position], given relative to the chunk's first block."""
    first = _first_block(seq, window, block_size)
    blocks = np.asarray(seq.block_tables[g][first : -(-seq.context_end // block_size)], dtype=np.int64)
    pos = np.arange(seq.context_start, seq.context_end)
    lo = np.zeros_like(pos) if window is None else np.maximum(0, pos - window + 1)
    return (
        torch.from_numpy(blocks),
        torch.from_numpy((lo - first * block_size).astype(np.int32)),
        torch.from_numpy((pos + 1 - first * block_size).astype(np.int32)),
    )


def _sdpa_keys(
    seq: SeqLayout, g: int, window: int | None, block_size: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor | None]:
    start = _key_start(seq, window)
    index = torch.from_numpy(_slots(seq.block_tables[g], start, seq.context_end, block_size)).to(device)
    if start == seq.context_start and (window is None or seq.num_tokens <= window):
        return index, None
    qpos = np.arange(seq.context_start, seq.context_end)[:, None]
    kpos = np.arange(start, seq.context_end)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= qpos - kpos < window
    return index, torch.from_numpy(allowed).to(device)


class TorchAttentionBackend(AttentionBackend):
    """Reference and CPU fast path."""

    name = "torch"

    def build_metadata(
        self, seqs: list[SeqLayout], groups: list[KVGroupSpec], block_size: int, device: torch.device
    ) -> TorchMetadata:
        num_decodes = 0
        while num_decodes < len(seqs) and seqs[num_decodes].num_tokens == 1:
            num_decodes += 1
        if any(s.num_tokens == 1 for s in seqs[num_decodes:]):
            raise ValueError("single-token sequences must come first in the batch")
        out = []
        for g, spec in enumerate(groups):
            slots = np.concatenate(
                [_slots(s.block_tables[g], s.context_start, s.context_end, block_size) for s in seqs]
            )
            index = mask = span = None
            if num_decodes:
                index, mask, span = _decode_metadata(seqs[:num_decodes], g, spec.window, block_size, device)
            prefills = [
                PrefillSlice(s.token_start, s.token_start + s.num_tokens, s, g, spec.window, block_size, device)
                for s in seqs[num_decodes:]
            ]
            out.append(GroupMetadata(torch.from_numpy(slots).to(device), num_decodes, index, mask, span, prefills))
        return TorchMetadata(out)

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
        k_cache, v_cache, meta = _layer_cache(layer, metadata, cache)
        k_cache.index_copy_(0, meta.slot_mapping, k)
        v_cache.index_copy_(0, meta.slot_mapping, v)
        if meta.num_decodes == q.shape[0]:  # decodes only: no output to assemble
            return _decode(q, k_cache, v_cache, meta, scale)
        out = torch.empty_like(q)
        if meta.num_decodes:
            out[: meta.num_decodes] = _decode(q[: meta.num_decodes], k_cache, v_cache, meta, scale)
        for p in meta.prefills:
            out[p.token_start : p.token_end] = _prefill(
                q[p.token_start : p.token_end], k_cache, v_cache, p, scale, cache.block_size
            )
        return out

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
        """SDPA over the latents read back from the cache's two halves."""
        k_cache, v_cache, meta = _layer_cache(layer, metadata, cache)
        half = k_cache.shape[-1]
        padded = F.pad(latent, (0, 2 * half - latent.shape[-1])).view(-1, 2, 1, half)
        k_cache.index_copy_(0, meta.slot_mapping, padded[:, 0])
        v_cache.index_copy_(0, meta.slot_mapping, padded[:, 1])
        dim = latent.shape[-1]
        out = q.new_empty(q.shape[0], q.shape[1], value_dim)
        if meta.num_decodes:
            assert meta.decode_index is not None and meta.decode_mask is not None
            width = meta.decode_mask.shape[-1]
            halves = (
                _gather_blocks(k_cache, meta.decode_index, width),
                _gather_blocks(v_cache, meta.decode_index, width),
            )
            keys = torch.cat(halves, dim=-1)[..., :dim]  # [B, 1 key head, context, E]
            out[: meta.num_decodes] = _latent_sdpa(
                q[: meta.num_decodes].unsqueeze(1), keys, value_dim, meta.decode_mask, scale
            )[:, 0]
        for p in meta.prefills:
            key_index, mask = p.sdpa()
            keys = torch.cat((k_cache[key_index], v_cache[key_index]), dim=-1)[..., :dim].transpose(0, 1).unsqueeze(0)
            qp = q[p.token_start : p.token_end].transpose(0, 1).unsqueeze(0)
            out[p.token_start : p.token_end] = _latent_sdpa(qp, keys, value_dim, mask, scale)[0].transpose(0, 1)
        return out

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
        """Decode-only steps on the CPU kernels: one call per layer (see kernels.decode_attention_step)."""
        assert isinstance(metadata, TorchMetadata)
        g, i = cache.layer_slot[layer]
        meta = metadata.groups[g]
        k_cache = cache.k[g][i]
        if meta.num_decodes != qkv.shape[0] or qkv.dtype != torch.float32 or not _kernel_decode(k_cache):
            return None
        q_weight, k_weight = qk_norms if qk_norms is not None else (None, None)
        assert meta.decode_index is not None and meta.decode_span is not None
        return kernels.decode_attention_step(
            qkv,
            layout.heads,
            layout.kv_heads,
            layout.head_dim,
            q_weight,
            k_weight,
            layout.eps,
            *rope,
            k_cache,
            cache.v[g][i],
            meta.slot_mapping,
            meta.decode_index,
            *meta.decode_span,
            cache.block_size,
            layout.scale,
        )


def _layer_cache(
    layer: int, metadata: AttentionMetadata, cache: KVCache
) -> tuple[torch.Tensor, torch.Tensor, GroupMetadata]:
    """A layer's K and V cache tensors and its window group's step metadata."""
    assert isinstance(metadata, TorchMetadata)
    g, i = cache.layer_slot[layer]
    return cache.k[g][i], cache.v[g][i], metadata.groups[g]


def _latent_sdpa(
    q: torch.Tensor, keys: torch.Tensor, value_dim: int, mask: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """Attention over one head of latent keys whose first `value_dim` features are the values (causal without a
    mask)."""
    return F.scaled_dot_product_attention(
        q, keys, keys[..., :value_dim], attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
    )


def _kernel_decode(k_cache: torch.Tensor) -> bool:
    return k_cache.dtype == torch.float32 and k_cache.device.type == "cpu" and kernels.available()


def _decode(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: GroupMetadata, scale: float
) -> torch.Tensor:
    assert meta.decode_index is not None and meta.decode_mask is not None and meta.decode_span is not None
    if _kernel_decode(k_cache):
        # Reads K/V in place from the blocks: no gathered copy of every context each step.
        block_size = meta.decode_mask.shape[-1] // meta.decode_index.shape[1]
        return kernels.paged_decode_attention(
            q, k_cache, v_cache, meta.decode_index, *meta.decode_span, block_size, scale
        )
    batch, heads, dim = q.shape
    kv_heads = k_cache.shape[1]
    width = meta.decode_mask.shape[-1]
    qd = q.view(batch, kv_heads, heads // kv_heads, dim)
    keys = _gather_blocks(k_cache, meta.decode_index, width)
    values = _gather_blocks(v_cache, meta.decode_index, width)
    out = F.scaled_dot_product_attention(qd, keys, values, attn_mask=meta.decode_mask, scale=scale)
    return out.reshape(batch, heads, dim)


def _gather_blocks(cache: torch.Tensor, blocks: torch.Tensor, width: int) -> torch.Tensor:
    """[slots, kvh, d] cache, [batch, n] block ids -> [batch, kvh, n * block_size, d]."""
    kv_heads, dim = cache.shape[1], cache.shape[2]
    block_size = width // blocks.shape[1]
    paged = cache.view(-1, block_size, kv_heads, dim)
    # index_select copies whole blocks as rows; advanced indexing goes element by element (~4x slower here).
    rows = paged.index_select(0, blocks.flatten())
    return rows.view(blocks.shape[0], width, kv_heads, dim).transpose(1, 2)


def _prefill(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, p: PrefillSlice, scale: float, block_size: int
) -> torch.Tensor:
    if _kernel_decode(k_cache):
        return kernels.paged_prefill_attention(q, k_cache, v_cache, *p.paged(), block_size, scale)
    key_index, mask = p.sdpa()
    keys = k_cache[key_index].transpose(0, 1).unsqueeze(0)
    values = v_cache[key_index].transpose(0, 1).unsqueeze(0)
    qp = q.transpose(0, 1).unsqueeze(0)
    out = F.scaled_dot_product_attention(
        qp, keys, values, attn_mask=mask, is_causal=mask is None, scale=scale, enable_gqa=True
    )
    return out[0].transpose(0, 1)
