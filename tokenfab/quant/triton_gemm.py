"""Triton W4A16 dequant-GEMM for NVFP4 and INT4 weights on GPUs: y = x W^T with W decoded tile by tile in
registers from the packed nibbles and their scales (the stored tensors, never a dequantized copy).

E2M1 and E4M3 are decoded with integer arithmetic rather than fp8 dtypes, so the same kernel runs on any GPU
Triton supports and under TRITON_INTERPRET=1 on the CPU (how the tests exercise it without a GPU).
"""

from __future__ import annotations

import importlib.util
import os

import torch

if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised where triton is absent
    triton = tl = None

NVFP4, INT4 = 0, 1
"""Weight kinds the kernel decodes (a constexpr switch)."""


def available() -> bool:
    return triton is not None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


if triton is not None:

    @triton.jit
    def _decode_e2m1(code):
        """4-bit E2M1 code -> fp32: sign bit 3, exponent bits 1-2 (bias 1), mantissa bit 0; exponent 0 is subnormal."""
        exponent = (code >> 1) & 3
        mantissa = (code & 1).to(tl.float32)
        magnitude = tl.where(
            exponent == 0, mantissa * 0.5, (1.0 + mantissa * 0.5) * tl.exp2((exponent - 1).to(tl.float32))
        )
        return tl.where((code & 8) != 0, -magnitude, magnitude)

    @triton.jit
    def _decode_e4m3(bits):
        """fp8 E4M3 (fn) bit pattern -> fp32 (bias 7, exponent 0 is subnormal; NaN never occurs in scales)."""
        exponent = (bits >> 3) & 15
        mantissa = (bits & 7).to(tl.float32)
        magnitude = tl.where(
            exponent == 0, mantissa * 0.001953125, (1.0 + mantissa * 0.125) * tl.exp2((exponent - 7).to(tl.float32))
        )
        return tl.where((bits & 128) != 0, -magnitude, magnitude)

    @triton.jit
    def _w4a16_kernel(
        x_ptr,
        packed_ptr,
        scale_ptr,
        row_scale_ptr,
        out_ptr,
        M,
        N,
        K,
        stride_xm,
        stride_om,
        GROUP: tl.constexpr,
        KIND: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        half = tl.arange(0, BLOCK_K // 2)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + rows[:, None] * stride_xm + ks[None, :], mask=(rows[:, None] < M) & (ks[None, :] < K), other=0.0
            ).to(tl.float32)
            byte_cols = k0 // 2 + half
            wmask = (cols[:, None] < N) & (byte_cols[None, :] < K // 2)
            packed = tl.load(packed_ptr + cols[:, None] * (K // 2) + byte_cols[None, :], mask=wmask, other=0)
            packed = packed.to(tl.int32)
            # Even column in the low nibble: joining (low, high) on a last axis and flattening restores K order.
            codes = tl.reshape(tl.join(packed & 15, packed >> 4), (BLOCK_N, BLOCK_K))
            smask = (cols[:, None] < N) & (ks[None, :] < K)
            scale_index = cols[:, None] * (K // GROUP) + ks[None, :] // GROUP
            if KIND == 0:
                values = _decode_e2m1(codes)
                scales = _decode_e4m3(tl.load(scale_ptr + scale_index, mask=smask, other=0).to(tl.int32))
            else:
                values = ((codes ^ 8) - 8).to(tl.float32)
                scales = tl.load(scale_ptr + scale_index, mask=smask, other=0.0).to(tl.float32)
            w = values * scales
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        if KIND == 0:
            acc = acc * tl.load(row_scale_ptr + cols, mask=cols < N, other=0.0)[None, :]
        tl.store(
            out_ptr + rows[:, None] * stride_om + cols[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=(rows[:, None] < M) & (cols[None, :] < N),
        )


def _launch(
    x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, row_scale: torch.Tensor | None, group: int, kind: int
) -> torch.Tensor:
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    m, k = x2.shape
    n = packed.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m = 16 if m <= 16 else 32
    block_n, block_k = 64, 64
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w4a16_kernel[grid](
        x2,
        packed,
        scales,
        row_scale if row_scale is not None else scales,
        out,
        m,
        n,
        k,
        x2.stride(0),
        out.stride(0),
        GROUP=group,
        KIND=kind,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out.reshape(*shape[:-1], n)


def nvfp4_matmul(x: torch.Tensor, weight) -> torch.Tensor:
    """x [..., K] @ NVFP4Weight^T -> [..., N] in x's dtype."""
    return _launch(x, weight.packed, weight.block_scale.view(torch.uint8), weight.global_scale, 16, NVFP4)


def int4_matmul(x: torch.Tensor, weight) -> torch.Tensor:
    """x [..., K] @ Int4Weight^T -> [..., N] in x's dtype."""
    return _launch(x, weight.packed, weight.scales, None, weight.group_size, INT4)
