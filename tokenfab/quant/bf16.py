"""bf16 weight storage with fp32 compute: half the bytes of fp32, exact fp32 arithmetic on every CPU.

Every batch size runs the C++ kernel (weights widened to fp32 in registers for small batches, into an fp32 panel
for a register-tiled GEMM from 8 rows), which sums each output in one order whatever the batch: a row's result
never depends on the other rows (tokenfab.kernels.csrc.cpu_kernels). Without the kernels, torch's matmul runs.

`bf16-act` (BF16ActWeight) stores the same weights and takes the activations as bf16 where the CPU computes bf16
natively (AVX512_BF16 without AMX: `vdpbf16ps` on x rounded once, half the products of the fp32-accurate split):
vLLM's and oneDNN's precision at about twice the batched speed, still summed in one order at every batch size, so
still batch-invariant; greedy tokens may differ from the fp32 reference where two logits are within bf16's
rounding. Elsewhere it computes exactly as `bf16`.
"""

from __future__ import annotations

import torch

from tokenfab.kernels import cpu as kernels
from tokenfab.quant.base import LinearWeight
from tokenfab.quant.dense import DenseWeight


class BF16Weight(DenseWeight):
    name = "bf16"
    bf16_activations = False
    """Whether the kernel takes x as bf16 (BF16ActWeight on a CPU with native bf16)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__(weight.to(torch.bfloat16).contiguous())
        use_kernel = self.weight.device.type == "cpu" and kernels.supports(self.weight.shape[1], step=16)
        self._kernel = kernels.bind_linear_bf16(self.weight, self.bf16_activations) if use_kernel else None

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


def activations_note() -> str:
    """What bf16-act layers take as x on this machine's kernels (for the start-up log and /v1/models)."""
    if kernels.bf16_activations():
        return "bf16 activations (vdpbf16ps)"
    return "fp32 activations: bf16 activations need the avx512_bf16 kernel level (AVX512_BF16, no AMX)"


class BF16ActWeight(BF16Weight):
    """bf16 weights with bf16 activations where the CPU computes them natively (see the module's docstring)."""

    name = "bf16-act"

    def __init__(self, weight: torch.Tensor) -> None:
        self.bf16_activations = kernels.bf16_activations()
        super().__init__(weight)


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
        and gate_up.bf16_activations == down.bf16_activations
        and x.dim() == 2
        and x.dtype == torch.float32
    ):
        return None
    return kernels.gated_mlp_bf16(x.contiguous(), gate_up.weight, down.weight, gelu_tanh, gate_up.bf16_activations)
