"""Native FP4 GEMM (W4A4) for NVFP4 weights on GPUs with FP4 tensor cores (Blackwell, compute capability >= 10)
through torch._scaled_mm: activations are quantized per call with the same NVFP4 recipe as weights, both block
scales are handed to cuBLAS in its swizzled 128x4 layout, and the two per-tensor scales are applied after."""

from __future__ import annotations

import torch


def supported(device: torch.device) -> bool:
    return (
        device.type == "cuda"
        and hasattr(torch, "float4_e2m1fn_x2")
        and hasattr(torch, "_scaled_mm")
        and torch.cuda.get_device_capability(device) >= (10, 0)
    )


def to_blocked(scales: torch.Tensor) -> torch.Tensor:
    """[rows, cols] block scales -> cuBLAS's blocked layout: 128 x 4 tiles, each stored as 32 x 16 (rows in four
    interleaved groups of 32), padded with zeros to whole tiles, flattened."""
    rows, cols = scales.shape
    row_tiles, col_tiles = -(-rows // 128), -(-cols // 4)
    padded = scales.new_zeros((row_tiles * 128, col_tiles * 4))
    padded[:rows, :cols] = scales
    tiles = padded.view(row_tiles, 128, col_tiles, 4).permute(0, 2, 1, 3)
    return tiles.reshape(-1, 4, 32, 4).transpose(1, 2).reshape(-1, 32, 16).flatten()


def nvfp4_scaled_mm(x: torch.Tensor, weight) -> torch.Tensor:
    """x [..., K] @ NVFP4Weight^T with x quantized to NVFP4 on the fly -> [..., N] in x's dtype."""
    from tokenfab.quant.nvfp4 import NVFP4Weight

    shape = x.shape
    act = NVFP4Weight.quantize(x.reshape(-1, shape[-1]))
    out = torch._scaled_mm(
        act.packed.view(torch.float4_e2m1fn_x2),
        weight.packed.view(torch.float4_e2m1fn_x2).t(),
        scale_a=to_blocked(act.block_scale),
        scale_b=to_blocked(weight.block_scale),
        out_dtype=torch.bfloat16,
    )
    out = out.float() * act.global_scale[0] * weight.global_scale[None, :]
    return out.to(x.dtype).reshape(*shape[:-1], -1)
