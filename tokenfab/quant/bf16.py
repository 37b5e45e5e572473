"""bf16 weight storage with fp32 compute: half the bytes of fp32 where the CPU has no bf16 arithmetic.

Decode-sized batches run the C++ kernel (weights widened to fp32 in registers, so memory traffic is the bf16
bytes); large batches (prefill) widen the weight once into fp32 and use torch's GEMM, where the FLOPs dwarf
the conversion.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from tokenfab.kernels import cpu as kernels
from tokenfab.quant.base import LinearWeight
from tokenfab.quant.dense import DenseWeight

KERNEL_MAX_ROWS = 128
"""Above this many rows the widened-weight GEMM can beat the kernel (measured on AVX2, 2 threads, Gemma 3 270M's
shapes: the kernel's GEMM tile leads up to 128 rows, e.g. 135 vs 77 GFLOP/s for a 4096 x 640 weight at 128 rows;
from 256 the two trade places by shape)."""


class BF16Weight(DenseWeight):
    name = "bf16"

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight.to(torch.bfloat16).contiguous())
        use_kernel = self.weight.device.type == "cpu" and kernels.supports(self.weight.shape[1], step=16)
        self._kernel = kernels.bind_linear_bf16(self.weight) if use_kernel else None

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> BF16Weight:
        return cls(weight)

    @property
    def use_kernel(self) -> bool:
        return self._kernel is not None

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is None:
            return super().matmul(x)
        rows = x.numel() // x.shape[-1]
        if rows <= KERNEL_MAX_ROWS:
            y = self._kernel(x)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        return F.linear(x.float(), kernels.dequant_bf16(self.weight)).to(x.dtype)


def fused_gated_mlp(gate_up: LinearWeight | None, down: LinearWeight | None, x: torch.Tensor,
                    gelu_tanh: bool) -> torch.Tensor | None:
    """down(act(gate(x)) * up(x)) in one kernel call when both projections are stored bf16 on the CPU kernels and
    x [rows, K] float32 is a batch they would each compute with the kernel (the result is then the same bit for
    bit); None otherwise."""
    if not (isinstance(gate_up, BF16Weight) and isinstance(down, BF16Weight) and gate_up.use_kernel
            and down.use_kernel and x.dim() == 2 and x.shape[0] <= KERNEL_MAX_ROWS and x.dtype == torch.float32):
        return None
    return kernels.gated_mlp_bf16(x.contiguous(), gate_up.weight, down.weight, gelu_tanh)
