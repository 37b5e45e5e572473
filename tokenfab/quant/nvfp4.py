"""NVFP4: E2M1 values, one FP8 E4M3 scale per 16 inputs, one FP32 scale per tensor (per row once fused).

Quantization follows NVIDIA TensorRT Model Optimizer (modelopt/torch/quantization/qtensor/nvfp4_tensor.py,
NVFP4QTensor: get_weights_scaling_factor_2, get_weights_scaling_factor, _cast_fp4, quantize), step for step:

    scale_2     = amax(|W|) / (6 * 448)                                  fp32, per tensor
    block_scale = fp8_e4m3(max(block_amax / (6 * scale_2), 2**-9))       round-to-nearest-even; a zero block -> 1.0
    code        = E2M1 round-to-nearest of W / (float(block_scale) * scale_2), ties to the even code, saturating at
                  6; the sign bit is set for any negative input, so tiny negatives become code 8 (-0), as there.
    W           = e2m1(code) * (float(block_scale) * scale_2)

Only departure: an all-zero tensor (ModelOpt divides 0 by 0 there) gets scale_2 = 0 and decodes to zeros.
"""

from __future__ import annotations

import torch

from tokenfab.quant import cpu_linear
from tokenfab.quant.base import QuantizedWeight, dequantized_linear, row_chunks, tensor_bytes
from tokenfab.quant.nibbles import byte_table, decode_bytes, pack_nibbles, unpack_nibbles

BLOCK = 16
E2M1_MAX = 6.0
E4M3_MAX = 448.0
E4M3_MIN_SUBNORMAL = 2.0**-9
E2M1_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
"""Value of each 4-bit code: bit 3 is the sign, bits 0-2 index the magnitudes."""
_MIDPOINTS = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
_TIES_UP = (0.75, 1.75, 3.5)
"""Midpoints whose upper neighbour (1, 2, 4) has the even mantissa: a tie there rounds up, elsewhere down."""


def e2m1_codes(x: torch.Tensor) -> torch.Tensor:
    """Round fp32 values to E2M1 codes (uint8 in [0, 16))."""
    magnitude = x.abs().contiguous()
    index = torch.searchsorted(_MIDPOINTS.to(x.device), magnitude)  # first midpoint >= |x|: ties go down
    for tie in _TIES_UP:
        index += (magnitude == tie).to(index.dtype)
    return index.to(torch.uint8) | ((x < 0).to(torch.uint8) << 3)


def tensor_scale(weight: torch.Tensor) -> torch.Tensor:
    """scale_2 = amax / (6 * 448), fp32 scalar."""
    return weight.abs().amax().float() / (E2M1_MAX * E4M3_MAX)


def block_scales(weight: torch.Tensor, scale_2: torch.Tensor) -> torch.Tensor:
    """fp8 E4M3 scale per 16 consecutive inputs: [N, K/16]."""
    n, k = weight.shape
    amax = weight.reshape(n, k // BLOCK, BLOCK).abs().amax(dim=-1).float()
    scale = amax / (E2M1_MAX * scale_2)
    scale[scale == 0] = 1.0  # also covers an all-zero tensor, where 0 / 0 would be NaN
    scale = torch.nan_to_num(scale, nan=1.0)
    # The upper clamp never binds (block amax <= tensor amax) but keeps a rounding ulp from reaching fp8's NaN.
    return scale.clamp(E4M3_MIN_SUBNORMAL, E4M3_MAX).to(torch.float8_e4m3fn)


class NVFP4Weight(QuantizedWeight):
    name = "nvfp4"

    def __init__(
        self,
        packed: torch.Tensor,
        block_scale: torch.Tensor,
        global_scale: torch.Tensor,
        input_scale: torch.Tensor | None = None,
    ) -> None:
        n, half_k = packed.shape
        if packed.dtype != torch.uint8 or block_scale.dtype != torch.float8_e4m3fn:
            raise ValueError("nvfp4 needs uint8 packed values and float8_e4m3fn block scales")
        if block_scale.shape != (n, 2 * half_k // BLOCK) or global_scale.shape != (n,):
            raise ValueError(
                f"nvfp4 scale shapes {tuple(block_scale.shape)}, {tuple(global_scale.shape)} do not fit "
                f"packed {tuple(packed.shape)}"
            )
        self.packed = packed
        """uint8 [N, K/2]: E2M1 codes, even column in the low nibble."""
        self.block_scale = block_scale
        """float8_e4m3fn [N, K/16]."""
        self.global_scale = global_scale.float()
        """float32 [N]: the per-tensor weight_scale_2 of the projection each row came from."""
        self.input_scale = input_scale
        """float32 scalar activation scale for W4A4 (unused by weight-only matmuls)."""

    @classmethod
    def supports(cls, shape: tuple[int, ...]) -> bool:
        return shape[1] % BLOCK == 0

    @classmethod
    def quantize(cls, weight: torch.Tensor) -> NVFP4Weight:
        if not cls.supports(tuple(weight.shape)):
            raise ValueError(f"nvfp4 needs in_features divisible by {BLOCK}, got {tuple(weight.shape)}")
        scale_2 = tensor_scale(weight)
        n, k = weight.shape
        packed, scales = [], []
        for start, end in row_chunks(n, k):
            w = weight[start:end].float()
            s = block_scales(w, scale_2)
            divisor = s.float() * scale_2
            scaled = (w.view(end - start, k // BLOCK, BLOCK) / divisor.unsqueeze(-1)).view(end - start, k)
            scaled = torch.nan_to_num(scaled, nan=0.0)  # 0 / 0 in an all-zero tensor
            packed.append(pack_nibbles(e2m1_codes(scaled)))
            scales.append(s)
        return cls(torch.cat(packed), torch.cat(scales), scale_2.expand(n).clone())

    @property
    def shape(self) -> tuple[int, ...]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.packed, self.block_scale, self.global_scale)

    def codes(self) -> torch.Tensor:
        """uint8 [N, K] E2M1 codes."""
        return unpack_nibbles(self.packed)

    def dequantize_rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        table = byte_table(E2M1_VALUES).to(self.packed.device, torch.float32)
        values = decode_bytes(self.packed[start:end], table)
        n, k = values.shape
        scale = self.block_scale[start:end].float() * self.global_scale[start:end, None]
        return (values.view(n, k // BLOCK, BLOCK) * scale.unsqueeze(-1)).view(n, k).to(dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            from tokenfab.quant import native_fp4, triton_gemm

            if native_fp4.supported(x.device):
                return native_fp4.nvfp4_scaled_mm(x, self)
            if triton_gemm.available():
                return triton_gemm.nvfp4_matmul(x, self)
        elif (y := cpu_linear.nvfp4(x, self)) is not None:
            return y
        return dequantized_linear(x, self)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """ModelOpt's per-projection tensors; a projection has one weight_scale_2."""
        scale_2 = self.global_scale[0]
        if not torch.equal(self.global_scale, scale_2.expand_as(self.global_scale)):
            raise ValueError("a fused nvfp4 weight has several weight_scale_2 values; save its projections instead")
        input_scale = self.input_scale if self.input_scale is not None else torch.tensor(1.0)
        return {
            "weight": self.packed,
            "weight_scale": self.block_scale,
            "weight_scale_2": scale_2.clone(),
            "input_scale": input_scale.float().reshape(()),
        }

    @classmethod
    def from_checkpoint_tensors(cls, tensors: dict[str, torch.Tensor], config: dict) -> NVFP4Weight:
        group = int(config.get("group_size", BLOCK))
        if group != BLOCK:
            raise ValueError(f"nvfp4 checkpoints have group_size {BLOCK}, got {group}")
        packed = tensors["weight"]
        scale_2 = tensors["weight_scale_2"].float().reshape(-1)
        if scale_2.numel() != 1:
            raise ValueError(f"weight_scale_2 must be a scalar, got shape {tuple(tensors['weight_scale_2'].shape)}")
        input_scale = tensors.get("input_scale")
        return cls(
            packed,
            tensors["weight_scale"],
            scale_2.expand(packed.shape[0]).clone(),
            None if input_scale is None else input_scale.float().reshape(()),
        )

    @classmethod
    def cat_rows(cls, parts: list[NVFP4Weight]) -> NVFP4Weight:
        # Shards of one fused layer read the same activations; a W4A4 path would quantize them with one scale.
        inputs = [p.input_scale for p in parts if p.input_scale is not None]
        return cls(
            torch.cat([p.packed for p in parts]),
            torch.cat([p.block_scale for p in parts]),
            torch.cat([p.global_scale for p in parts]),
            torch.stack(inputs).amax() if inputs else None,
        )
