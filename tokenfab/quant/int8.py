"""INT8 weight-only (W8A16 / W8A32): W = q * scale, q in [-127, 127], one fp32 scale per output channel."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenfab.quant import cpu_linear
from tokenfab.quant.base import QuantizedWeight, tensor_bytes


class Int8Weight(QuantizedWeight):
    name = "int8"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        if qweight.dtype != torch.int8 or scale.shape != (qweight.shape[0],):
            raise ValueError(
                f"int8 needs int8 qweight [N, K] and scale [N], got {qweight.dtype} "
                f"{tuple(qweight.shape)}, {tuple(scale.shape)}"
            )
        self.qweight = qweight
        """int8 [N, K]."""
        self.scale = scale.float()
        """float32 [N]."""

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> Int8Weight:
        w = weight.float()
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
        q = (w / scale[:, None]).round_().clamp_(-127, 127).to(torch.int8)
        return cls(q, scale)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.qweight.shape)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.qweight, self.scale)

    def dequantize_rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        return (self.qweight[start:end].float() * self.scale[start:end, None]).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if (y := cpu_linear.int8(x, self)) is not None:
            return y
        return scaled_rows_linear(x, self.qweight, self.scale)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.qweight, "weight_scale": self.scale}

    @classmethod
    def from_checkpoint_tensors(cls, tensors: dict[str, torch.Tensor], config: dict) -> Int8Weight:
        return cls(tensors["weight"], tensors["weight_scale"].float().reshape(-1))

    @classmethod
    def cat_rows(cls, parts: list[Int8Weight]) -> Int8Weight:
        return cls(torch.cat([p.qweight for p in parts]), torch.cat([p.scale for p in parts]))


# Rows converted at once by the reference path (the LM head never materializes whole in float).
_CHUNK_ELEMENTS = 1 << 22


def scaled_rows_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (q * scale)^T computed as (x q^T) * scale: a per-output-channel scale commutes with the dot product, so
    only a dtype conversion of q is needed per chunk (equal to F.linear(x, dequantize()) up to rounding)."""
    n, k = q.shape
    rows = max(1, _CHUNK_ELEMENTS // k)
    out = x.new_empty(*x.shape[:-1], n)
    for start in range(0, n, rows):
        end = min(start + rows, n)
        out[..., start:end] = F.linear(x, q[start:end].to(x.dtype)) * scale[start:end].to(x.dtype)
    return out
