"""FP8 (E4M3) weights with one fp32 scale per output channel: W = float(q) * scale, scale = amax / 448.

Weight-only here (the CPU has no FP8 arithmetic); on GPUs with FP8 tensor cores (compute capability >= 8.9) the
matmul runs W8A8 through torch._scaled_mm with a dynamic per-token activation scale.
"""

from __future__ import annotations

import torch

from tokenfab.quant import cpu_linear
from tokenfab.quant.base import QuantizedWeight, tensor_bytes
from tokenfab.quant.int8 import scaled_rows_linear

E4M3_MAX = 448.0


class FP8Weight(QuantizedWeight):
    name = "fp8"

    def __init__(self, qweight: torch.Tensor, scale: torch.Tensor) -> None:
        if qweight.dtype != torch.float8_e4m3fn or scale.shape != (qweight.shape[0],):
            raise ValueError(
                f"fp8 needs float8_e4m3fn qweight [N, K] and scale [N], got {qweight.dtype} "
                f"{tuple(qweight.shape)}, {tuple(scale.shape)}"
            )
        self.qweight = qweight
        """float8_e4m3fn [N, K]."""
        self.scale = scale.float()
        """float32 [N]."""

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> FP8Weight:
        w = weight.float()
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / E4M3_MAX, torch.ones_like(amax))
        q = (w / scale[:, None]).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
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
        if x.is_cuda and fp8_gemm_supported(x.device):
            return fp8_scaled_mm(x, self.qweight, self.scale)
        if (y := cpu_linear.fp8(x, self)) is not None:
            return y
        return scaled_rows_linear(x, self.qweight, self.scale)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.qweight, "weight_scale": self.scale}

    @classmethod
    def from_checkpoint_tensors(cls, tensors: dict[str, torch.Tensor], config: dict) -> FP8Weight:
        return cls(tensors["weight"], tensors["weight_scale"].float().reshape(-1))

    @classmethod
    def cat_rows(cls, parts: list[FP8Weight]) -> FP8Weight:
        return cls(torch.cat([p.qweight for p in parts]), torch.cat([p.scale for p in parts]))


def fp8_gemm_supported(device: torch.device) -> bool:
    return hasattr(torch, "_scaled_mm") and torch.cuda.get_device_capability(device) >= (8, 9)


def fp8_scaled_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """W8A8: x quantized to fp8 per token (row), both scales applied by the GEMM's epilogue."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_scale = (x2.abs().amax(dim=1, keepdim=True).float() / E4M3_MAX).clamp_(min=1e-12)
    xq = (x2.float() / x_scale).clamp_(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    out = torch._scaled_mm(
        xq,
        qweight.t(),
        scale_a=x_scale,
        scale_b=scale.view(1, -1),
        out_dtype=torch.bfloat16 if x.dtype == torch.float32 else x.dtype,
    )
    return out.to(x.dtype).reshape(*shape[:-1], -1)
