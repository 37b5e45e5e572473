"""bf16 weight storage with fp32 compute: half the bytes of fp32 where the CPU has no bf16 arithmetic.

Decode-sized batches run the C++ kernel (weights widened to fp32 in registers, so memory traffic is the bf16
bytes); large batches (prefill) widen the weight once into fp32 and use torch's GEMM, where the FLOPs dwarf
the conversion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenfab.kernels import cpu as kernels
from tokenfab.quant.base import LinearWeight, tensor_bytes

KERNEL_MAX_ROWS = 48
"""Above this many rows the widened-weight GEMM beats the fused kernel (measured on AVX2, 2 threads)."""


class BF16Weight(LinearWeight):
    name = "bf16"

    def __init__(self, weight: torch.Tensor) -> None:
        self.weight = weight.to(torch.bfloat16).contiguous()
        self.use_kernel = self.weight.device.type == "cpu" and kernels.supports(self.weight.shape[1], step=16)
        self._kernel = kernels.bind_linear_bf16(self.weight) if self.use_kernel else None

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> BF16Weight:
        return cls(weight)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.weight)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is None:
            return F.linear(x.to(self.weight.dtype), self.weight).to(x.dtype)
        rows = x.numel() // x.shape[-1]
        if rows <= KERNEL_MAX_ROWS:
            y = self._kernel(x)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        return F.linear(x.float(), kernels.dequant_bf16(self.weight)).to(x.dtype)

    def dequantize(self) -> torch.Tensor:
        return self.weight.float()
