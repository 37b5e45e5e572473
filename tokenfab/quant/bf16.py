"""bf16 weight storage with fp32 compute: half the bytes of fp32, exact fp32 arithmetic on every CPU.

Every batch size runs the C++ kernel (weights widened to fp32 in registers for small batches, into an fp32 panel
for a register-tiled GEMM from 8 rows), which sums each output in one order whatever the batch: a row's result
never depends on the other rows (tokenfab.kernels.csrc.cpu_kernels). Without the kernels, torch's matmul runs.
"""

from __future__ import annotations

import torch

from tokenfab.kernels import cpu as kernels
from tokenfab.quant.base import LinearWeight
from tokenfab.quant.dense import DenseWeight


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
        y = self._kernel(x)
        return y if x.dtype == torch.float32 else y.to(x.dtype)


def fused_gated_mlp(
    gate_up: LinearWeight | None, down: LinearWeight | None, x: torch.Tensor, gelu_tanh: bool
) -> torch.Tensor | None:
    """down(act(gate(x)) * up(x)) in one kernel call when both projections are stored bf16 on the CPU kernels and
    x [rows, K] is float32 (the result is then the two products' bit for bit); None otherwise."""
    if not (
        isinstance(gate_up, BF16Weight)
        and isinstance(down, BF16Weight)
        and gate_up.use_kernel
        and down.use_kernel
        and x.dim() == 2
        and x.dtype == torch.float32
    ):
        return None
    return kernels.gated_mlp_bf16(x.contiguous(), gate_up.weight, down.weight, gelu_tanh)
