"""INT4 weight-only, group-wise symmetric: W = q * scale with q in [-8, 7], one fp16 scale per `group_size` inputs.

Stored as two's-complement nibbles (q & 0xF), two per byte, the even column in the low nibble.
"""

from __future__ import annotations

import torch

from tokenfab.quant import cpu_linear
from tokenfab.quant.base import QuantizedWeight, dequantized_linear, row_chunks, tensor_bytes
from tokenfab.quant.nibbles import byte_table, decode_bytes, pack_nibbles

GROUP_SIZE = 32
INT4_VALUES = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1], dtype=torch.float32)
"""Value of each nibble (two's complement)."""
# Scales tried per group, as amax / divisor: 7 never clips, 8 uses the -8 code at the cost of clipping the
# largest positive value; the one with the least squared error wins (round-to-nearest at amax / 7 alone measured
# a ~20 % larger error).
_DIVISORS = (7.0, 7.25, 7.5, 7.75, 8.0)


def _round_to_grid(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    q = torch.where(scale > 0, w / scale, torch.zeros_like(w))
    return q.round_().clamp_(-8, 7)


def quantize_groups(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w fp32 [N, G', G] -> (q int8 [N, G', G], scale fp16 [N, G'])."""
    amax = w.abs().amax(dim=-1, keepdim=True)
    best: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    for divisor in _DIVISORS:
        scale = (amax / divisor).half().float()  # choose q against the scale as stored
        q = _round_to_grid(w, scale)
        err = (q * scale - w).square_().sum(dim=-1, keepdim=True)
        if best is None:
            best = q, scale, err
        else:
            better = err < best[2]
            best = torch.where(better, q, best[0]), torch.where(better, scale, best[1]), torch.minimum(err, best[2])
    assert best is not None
    return best[0].to(torch.int8), best[1].squeeze(-1).half()


class Int4Weight(QuantizedWeight):
    name = "int4"

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, group_size: int = GROUP_SIZE) -> None:
        n, half_k = packed.shape
        if packed.dtype != torch.uint8 or scales.dtype != torch.float16:
            raise ValueError("int4 needs uint8 packed values and float16 scales")
        if scales.shape != (n, 2 * half_k // group_size) or (2 * half_k) % group_size:
            raise ValueError(
                f"int4 scales {tuple(scales.shape)} do not fit packed {tuple(packed.shape)} "
                f"with group_size {group_size}"
            )
        self.packed = packed
        """uint8 [N, K/2]: q & 0xF, even column in the low nibble."""
        self.scales = scales
        """float16 [N, K/group_size]."""
        self.group_size = group_size

    @classmethod
    def supports(cls, shape: tuple[int, ...], group_size: int = GROUP_SIZE) -> bool:
        return shape[1] % group_size == 0

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = GROUP_SIZE) -> Int4Weight:
        if not cls.supports(tuple(weight.shape), group_size):
            raise ValueError(f"int4 needs in_features divisible by {group_size}, got {tuple(weight.shape)}")
        n, k = weight.shape
        packed, scales = [], []
        for start, end in row_chunks(n, k):
            q, s = quantize_groups(weight[start:end].float().reshape(end - start, k // group_size, group_size))
            packed.append(pack_nibbles((q.reshape(end - start, k) & 0xF).to(torch.uint8)))
            scales.append(s)
        return cls(torch.cat(packed), torch.cat(scales), group_size)

    @property
    def shape(self) -> tuple[int, ...]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.packed, self.scales)

    def dequantize_rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        table = byte_table(INT4_VALUES).to(self.packed.device)
        q = decode_bytes(self.packed[start:end], table)
        n, k = q.shape
        scales = self.scales[start:end].float().unsqueeze(-1)
        return (q.view(n, k // self.group_size, self.group_size) * scales).view(n, k).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from tokenfab.quant import triton_gemm

            if triton_gemm.available():
                return triton_gemm.int4_matmul(x, self)
        elif (y := cpu_linear.int4(x, self)) is not None:
            return y
        return dequantized_linear(x, self)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.packed, "weight_scale": self.scales}

    @classmethod
    def from_checkpoint_tensors(cls, tensors: dict[str, torch.Tensor], config: dict) -> Int4Weight:
        return cls(tensors["weight"], tensors["weight_scale"], int(config["group_size"]))

    @classmethod
    def cat_rows(cls, parts: list[Int4Weight]) -> Int4Weight:
        if len({p.group_size for p in parts}) != 1:
            raise ValueError("cannot fuse int4 weights with different group sizes")
        return cls(torch.cat([p.packed for p in parts]), torch.cat([p.scales for p in parts]), parts[0].group_size)
