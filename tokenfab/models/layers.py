"""Building blocks of the decoder: RMSNorm, rotary embedding, gated MLP activation, a linear over any weight
format."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from tokenfab.kernels import cpu as kernels
from tokenfab.quant.base import LinearWeight, tensor_bytes
from tokenfab.quant.gguf_packed import GGUFWeight


class Linear(nn.Module):
    """y = x W^T (+ b). The weight loads as a plain parameter; `use` then hands it to a storage format
    (oneDNN-packed, bf16, quantized: see tokenfab.quant) that owns the matmul."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.stored: LinearWeight | None = None

    def use(self, stored: LinearWeight, keep_plain: bool = False) -> None:
        """Compute through `stored` from now on; the plain weight is dropped unless something else (a tied
        embedding) still reads it."""
        if stored.shape != (self.out_features, self.in_features):
            raise ValueError(f"weight format shape {stored.shape} != {(self.out_features, self.in_features)}")
        self.stored = stored
        if not keep_plain:
            self.weight = None  # type: ignore[assignment]  # dropped: `stored` computes from now on

    @property
    def nbytes(self) -> int:
        """Bytes one forward reads."""
        w = self.stored.nbytes if self.stored is not None else tensor_bytes(self.weight)
        return w + tensor_bytes(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stored is None:
            return F.linear(x, self.weight, self.bias)
        y = self.stored.matmul(x)
        return y if self.bias is None else y + self.bias


class PackedEmbedding(nn.Module):
    """Token embedding looked up in a GGUF file's own blocks: only the batch's rows are decoded, so the table
    costs its packed bytes (Gemma 3 270M: 178 MB of Q8_0, not 671 MB of fp32), shared with a tied LM head."""

    def __init__(self, table: GGUFWeight) -> None:
        super().__init__()
        self.table = table
        self.num_embeddings, self.embedding_dim = table.shape

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table.embedding(input_ids)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32; Gemma's (1 + w) scale is folded into the stored weight at load time."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and x.device.type == "cpu" and kernels.available():
            # torch's CPU rms_norm is five ops; at decode sizes the fused kernel is ~20x faster.
            return kernels.rms_norm(x.contiguous(), self.weight, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def add_norm(
    x: torch.Tensor, h: torch.Tensor, post: RMSNorm | None, norm: RMSNorm | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The residual step after a sublayer: x + post(h) (x + h without a post-sublayer norm), and `norm` of that
    sum for the next sublayer (None without one). May update x in place: the caller owns the residual stream.
    On CPU in fp32 it is one kernel call instead of three tensor ops and two norms."""
    if norm is not None and x.dtype == torch.float32 and x.device.type == "cpu" and kernels.available():
        normed = kernels.add_rms_norm_(
            x, h.contiguous(), post.weight if post is not None else None, norm.weight, norm.eps
        )
        return x, normed
    x = x + (post(h) if post is not None else h)
    return x, norm(x) if norm is not None else None


def gated_activation(name: str, gate_up: torch.Tensor) -> torch.Tensor:
    """act(gate) * up of a fused gate/up projection [..., 2 * intermediate] (gate first); act is `name`
    (gelu_tanh or silu)."""
    if gate_up.dtype == torch.float32 and gate_up.device.type == "cpu" and kernels.available():
        return kernels.gated_act(gate_up.contiguous(), name == "gelu_tanh")
    gate, up = gate_up.chunk(2, dim=-1)
    if name == "gelu_tanh":
        return F.gelu(gate, approximate="tanh") * up
    return F.silu(gate) * up


def _inv_freq(head_dim: int, theta: float, scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if not scaling:
        return inv_freq, 1.0
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind == "linear":
        return inv_freq / float(scaling["factor"]), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(inv_freq, scaling), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(inv_freq, head_dim, theta, scaling)
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: linear, llama3, yarn)")


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention scaling of a context `scale`-times the trained one: 0.1 mscale ln(scale) + 1."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(inv_freq: torch.Tensor, dim: int, theta: float, s: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN (DeepSeek-V3, Qwen long context): frequencies above `beta_fast` rotations over the trained context kept,
    below `beta_slow` divided by `factor`, a linear ramp between; cos/sin scaled by the attention factor."""
    factor, trained = float(s["factor"]), float(s["original_max_position_embeddings"])
    factor_attn = s.get("attention_factor")
    if factor_attn is None:
        mscale, mscale_all = s.get("mscale"), s.get("mscale_all_dim")
        factor_attn = (
            yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all)
            if mscale and mscale_all
            else (yarn_mscale(factor))
        )

    def correction_dim(rotations: float) -> float:
        return dim * math.log(trained / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(float(s.get("beta_fast") or 32)), correction_dim(float(s.get("beta_slow") or 1))
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / ((high - low) or 0.001)).clamp(0, 1)
    kept = 1 - ramp
    return inv_freq / factor * (1 - kept) + inv_freq * kept, float(factor_attn)


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict[str, Any]) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Non-interleaved (rotate-half) rotary embedding with a precomputed cos/sin table."""

    cos: torch.Tensor
    sin: torch.Tensor

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict[str, Any] | None) -> None:
        super().__init__()
        inv_freq, attention_factor = _inv_freq(head_dim, theta, scaling)
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", emb.cos() * attention_factor, persistent=False)
        self.register_buffer("sin", emb.sin() * attention_factor, persistent=False)

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for a step's positions, shaped [T, 1, D] to broadcast over heads; computed once per step."""
        return self.cos[positions].unsqueeze(1).to(dtype), self.sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [T, H, D], k: [T, KVH, D]."""
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)
