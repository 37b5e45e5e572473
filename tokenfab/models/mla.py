"""Multi-head latent attention (DeepSeek-V2/V3) over the paged cache, in its absorbed form.

Each token's keys and values are expanded from a compressed latent c (kv_lora_rank) by kv_b_proj, and share one
rotary key k_r. Rather than expanding every cached token's keys and values each step, the expansion is folded into
the query and the output (the "absorbed" form, as DeepSeek serves it): per head h,

    q_h · k_h = q_nope_h · (W_UK_h c) + q_rope_h · k_r = (W_UK_h^T q_nope_h) · c + q_rope_h · k_r
    o_h = W_UV_h Σ p c

so attention is one-key-head attention over [c, k_r] with values c, and the cache holds only [c, k_r] per token
and layer — kv_lora_rank + qk_rope_head_dim numbers (DeepSeek-V3: 576) instead of heads × (key + value dims)
(MHA with its shapes: 128 × (192 + 128) = 40,960). The latent is stored split across the cache's K and V tensors
(ArchConfig.kv_cache_layout).
"""

from __future__ import annotations

import torch
from torch import nn

from tokenfab.attention.backend import current_forward_context
from tokenfab.models.arch import ArchConfig
from tokenfab.models.layers import Linear, RMSNorm, apply_rotary

Rope = tuple[torch.Tensor, torch.Tensor]


class Weight(nn.Module):
    """A projection used as a tensor, not a matmul over tokens (kv_b_proj: split and folded per head)."""

    def __init__(self, out_features: int, in_features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)


def apply_rotary_interleaved(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> Rope:
    """Rotary embedding over interleaved pairs (x0, x1), (x2, x3), …, the results laid out as [evens, odds] (as
    transformers lays them: the same permutation of q and k leaves their products unchanged). cos, sin: the
    rotate-half tables [T, 1, D], whose first half holds each pair's angle."""
    half = cos.shape[-1] // 2
    c, s = cos[..., :half], sin[..., :half]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.cat((even * c - odd * s, odd * c + even * s), dim=-1)

    return rotate(q), rotate(k)


class MLAttention(nn.Module):
    def __init__(self, arch: ArchConfig, layer: int) -> None:
        super().__init__()
        assert arch.mla is not None
        m = self.mla = arch.mla
        self.layer = layer
        self.heads = arch.num_heads
        self.scale = arch.softmax_scale
        hidden, q_dim = arch.hidden_size, arch.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim)
        if m.q_lora_rank is None:
            self.q_proj: Linear | None = Linear(hidden, q_dim)
            self.q_a_proj = self.q_b_proj = None
            self.q_a_layernorm: RMSNorm | None = None
        else:
            self.q_proj = None
            self.q_a_proj = Linear(hidden, m.q_lora_rank, bias=arch.qkv_bias)
            self.q_a_layernorm = RMSNorm(m.q_lora_rank, arch.rms_norm_eps)
            self.q_b_proj = Linear(m.q_lora_rank, q_dim)
        self.kv_a_proj_with_mqa = Linear(hidden, m.latent_dim, bias=arch.qkv_bias)
        self.kv_a_layernorm = RMSNorm(m.kv_lora_rank, arch.rms_norm_eps)
        self.kv_b_proj = Weight(arch.num_heads * (m.qk_nope_head_dim + m.v_head_dim), m.kv_lora_rank)
        self.o_proj = Linear(arch.num_heads * m.v_head_dim, hidden, bias=arch.qkv_bias)

    def forward(self, rope: Rope, x: torch.Tensor) -> torch.Tensor:
        m, heads, tokens = self.mla, self.heads, x.shape[0]
        if self.q_proj is not None:
            q = self.q_proj(x)
        else:
            assert self.q_a_proj is not None and self.q_a_layernorm is not None and self.q_b_proj is not None
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(tokens, heads, -1).split([m.qk_nope_head_dim, m.qk_rope_head_dim], dim=-1)
        c, k_rope = self.kv_a_proj_with_mqa(x).split([m.kv_lora_rank, m.qk_rope_head_dim], dim=-1)
        c = self.kv_a_layernorm(c.contiguous())
        rotate = apply_rotary_interleaved if m.rope_interleave else apply_rotary
        q_rope, k_rope = rotate(q_rope, k_rope.reshape(tokens, 1, -1), *rope)
        w = self.kv_b_proj.weight.view(heads, m.qk_nope_head_dim + m.v_head_dim, m.kv_lora_rank)
        w_uk, w_uv = w[:, : m.qk_nope_head_dim], w[:, m.qk_nope_head_dim :]
        q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # [T, H, kv_lora_rank]
        query = torch.cat((q_latent, q_rope), dim=-1)
        latent = torch.cat((c, k_rope.reshape(tokens, -1)), dim=-1)
        ctx = current_forward_context()
        out = ctx.backend.forward_latent(self.layer, query, latent, m.kv_lora_rank, self.scale, ctx.metadata, ctx.cache)
        values = torch.bmm(out.transpose(0, 1), w_uv.transpose(1, 2))  # [H, T, v_head_dim]
        return self.o_proj(values.transpose(0, 1).reshape(tokens, heads * m.v_head_dim))
