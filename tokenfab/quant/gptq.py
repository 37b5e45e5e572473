"""GPTQ (Frantar et al., 2022): choose a format's codes column by column, pushing each column's rounding error
onto the columns not yet quantized through the inverse Hessian of the layer's inputs, H = X^T X over calibration
tokens. The stored tensors and their meaning are exactly the format's (int4 or NVFP4); only which codes and block
scales are picked changes, so a checkpoint written this way loads anywhere the format loads.

Groups (int4: 32 inputs, NVFP4: 16) get their scale when their first column comes up, from the weights as
updated by the error feedback so far; NVFP4's per-tensor scale_2 is fixed up front from the original amax.
"""

from __future__ import annotations

import torch

from tokenfab.quant.base import QuantizedWeight
from tokenfab.quant.int4 import Int4Weight, quantize_groups
from tokenfab.quant.nibbles import pack_nibbles
from tokenfab.quant.nvfp4 import BLOCK, E2M1_VALUES, NVFP4Weight, block_scales, e2m1_codes, tensor_scale

COLUMN_BLOCK = 128
"""Columns updated eagerly; the rest of the matrix gets each block's error in one matmul (the 'lazy batch')."""
DAMPING = 0.01
"""Fraction of the mean diagonal added to H, as in the reference implementation."""


class _Int4Rounding:
    group = 32

    def __init__(self, weight: torch.Tensor) -> None:
        n, k = weight.shape
        self.q = torch.zeros(n, k, dtype=torch.int8)
        self.scales = torch.zeros(n, k // self.group, dtype=torch.float16)

    def start_group(self, g: int, block: torch.Tensor) -> None:
        _, scale = quantize_groups(block.unsqueeze(1))
        self.scales[:, g] = scale[:, 0]

    def round(self, col: int, w: torch.Tensor) -> torch.Tensor:
        scale = self.scales[:, col // self.group].float()
        q = torch.where(scale > 0, w / scale, torch.zeros_like(w)).round_().clamp_(-8, 7)
        self.q[:, col] = q.to(torch.int8)
        return q * scale

    def build(self) -> QuantizedWeight:
        return Int4Weight(pack_nibbles((self.q & 0xF).to(torch.uint8)), self.scales, self.group)


class _NVFP4Rounding:
    group = BLOCK

    def __init__(self, weight: torch.Tensor) -> None:
        n, k = weight.shape
        self.scale_2 = tensor_scale(weight)
        self.codes = torch.zeros(n, k, dtype=torch.uint8)
        self.block_scale = torch.zeros(n, k // self.group, dtype=torch.float8_e4m3fn)
        self._divisor = torch.zeros(n)

    def start_group(self, g: int, block: torch.Tensor) -> None:
        self.block_scale[:, g] = block_scales(block, self.scale_2)[:, 0]
        self._divisor = self.block_scale[:, g].float() * self.scale_2

    def round(self, col: int, w: torch.Tensor) -> torch.Tensor:
        codes = e2m1_codes(torch.nan_to_num(w / self._divisor, nan=0.0))
        self.codes[:, col] = codes
        return E2M1_VALUES[codes.long()] * self._divisor

    def build(self) -> QuantizedWeight:
        n = self.codes.shape[0]
        return NVFP4Weight(pack_nibbles(self.codes), self.block_scale, self.scale_2.expand(n).clone())


ROUNDINGS: dict[type[QuantizedWeight], type[_Int4Rounding | _NVFP4Rounding]] = {
    Int4Weight: _Int4Rounding,
    NVFP4Weight: _NVFP4Rounding,
}


def supports(cls: type[QuantizedWeight]) -> bool:
    return cls in ROUNDINGS


def inverse_hessian_factor(hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(upper Cholesky factor of H^-1 after damping, mask of inputs that were never active)."""
    h = hessian.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    h += DAMPING * torch.diag(h).mean() * torch.eye(h.shape[0], dtype=h.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(inverse, upper=True).float(), dead


def gptq_quantize(cls: type[QuantizedWeight], weight: torch.Tensor, hessian: torch.Tensor) -> QuantizedWeight:
    """weight [N, K] (float), hessian [K, K] of the layer's inputs -> the format, with error-compensated codes."""
    w = weight.float().clone()
    rounding = ROUNDINGS[cls](w)
    hinv, dead = inverse_hessian_factor(hessian)
    w[:, dead] = 0.0
    k = w.shape[1]
    for start in range(0, k, COLUMN_BLOCK):
        end = min(start + COLUMN_BLOCK, k)
        block = w[:, start:end].clone()
        errors = torch.zeros_like(block)
        h = hinv[start:end, start:end]
        for i in range(end - start):
            col = start + i
            if col % rounding.group == 0:
                rounding.start_group(col // rounding.group, block[:, i : i + rounding.group])
            err = (block[:, i] - rounding.round(col, block[:, i])) / h[i, i]
            block[:, i:] -= err.unsqueeze(1) * h[i, i:].unsqueeze(0)
            errors[:, i] = err
        w[:, end:] -= errors @ hinv[start:end, end:]
    return rounding.build()
