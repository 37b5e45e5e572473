"""The quantized formats on CPU, through tokenfab.kernels.

nvfp4 and int4 run W4A8 and int8 runs W8A8: activations are rounded to int8 per 32 columns (scale max|x|/127,
as llama.cpp's Q8 blocks do) and the products are summed exactly in int32, which is what lets 4-bit weights
decode faster than the bytes alone would suggest on AVX2; `tokenfab eval` measures these very paths. fp8 widens
its weights to fp32 in registers (weight-only, exact). Each function returns None where the kernels cannot run
the shape or the machine has none, and the format falls back to its dequantize-then-linear reference.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from tokenfab.kernels import cpu as kernels

if TYPE_CHECKING:
    from tokenfab.quant.fp8 import FP8Weight
    from tokenfab.quant.int4 import Int4Weight
    from tokenfab.quant.int8 import Int8Weight
    from tokenfab.quant.nvfp4 import NVFP4Weight


def _usable(x: torch.Tensor, k_step: int, *tensors: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.shape[-1] % k_step == 0
        and kernels.available()
        and all(t.is_contiguous() for t in tensors)
    )


def nvfp4(x: torch.Tensor, w: NVFP4Weight) -> torch.Tensor | None:
    if not _usable(x, 32, w.packed, w.block_scale, w.global_scale):
        return None
    return kernels.linear_lut4_q8(x, w.packed, w.block_scale, 16, w.global_scale, kernels.E2M1_DOUBLED, 0.5).to(x.dtype)


def int4(x: torch.Tensor, w: Int4Weight) -> torch.Tensor | None:
    if w.group_size not in (16, 32) or w.scales.dtype != torch.float16 or not _usable(x, 32, w.packed, w.scales):
        return None
    return kernels.linear_lut4_q8(x, w.packed, w.scales, w.group_size, None, kernels.INT4_TWOS_COMPLEMENT, 1.0).to(
        x.dtype
    )


def int8(x: torch.Tensor, w: Int8Weight) -> torch.Tensor | None:
    if not _usable(x, 32, w.qweight, w.scale):
        return None
    return kernels.linear_int8_q8(x, w.qweight, w.scale).to(x.dtype)


def int8_runs_kernel(w: Int8Weight) -> bool:
    """Whether `int8` computes float32 CPU activations of this weight with the W8A8 kernel (at any batch size)."""
    return (
        w.qweight.device.type == "cpu"
        and w.shape[1] % 32 == 0
        and kernels.available()
        and w.qweight.is_contiguous()
        and w.scale.is_contiguous()
        and w.scale.dtype == torch.float32
    )


def fp8(x: torch.Tensor, w: FP8Weight) -> torch.Tensor | None:
    if w.qweight.dtype != torch.float8_e4m3fn or not _usable(x, 8, w.qweight, w.scale):
        return None
    return kernels.linear_fp8(x, w.qweight, w.scale).to(x.dtype)
