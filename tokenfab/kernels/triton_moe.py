"""Triton grouped GEMM for mixture-of-experts layers on GPUs: the rows of a step, sorted by expert, times each row's
expert weight, in one launch for every expert (vLLM's fused-MoE layout: each program takes up to BLOCK_M rows of
one expert and BLOCK_N output columns).

Runs on any GPU Triton supports and under TRITON_INTERPRET=1 on the CPU, which is how the tests exercise it
without a GPU.
"""

from __future__ import annotations

import importlib.util

import torch

if importlib.util.find_spec("triton") is not None:
    import triton
    import triton.language as tl
else:  # pragma: no cover - exercised where triton is absent
    triton = tl = None


def available() -> bool:
    return triton is not None


if triton is not None:

    @triton.jit
    def _grouped_kernel(
        x_ptr,
        w_ptr,
        out_ptr,
        block_expert_ptr,
        block_start_ptr,
        block_end_ptr,
        N,
        K,
        stride_xm,
        stride_we,
        stride_wn,
        stride_om,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        pid_b = tl.program_id(0)
        pid_n = tl.program_id(1)
        expert = tl.load(block_expert_ptr + pid_b).to(tl.int64)
        start = tl.load(block_start_ptr + pid_b)
        end = tl.load(block_end_ptr + pid_b)
        rows = start + tl.arange(0, BLOCK_M)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            ks = k0 + tl.arange(0, BLOCK_K)
            x = tl.load(
                x_ptr + rows[:, None] * stride_xm + ks[None, :],
                mask=(rows[:, None] < end) & (ks[None, :] < K),
                other=0.0,
            ).to(tl.float32)
            w = tl.load(
                w_ptr + expert * stride_we + cols[:, None] * stride_wn + ks[None, :],
                mask=(cols[:, None] < N) & (ks[None, :] < K),
                other=0.0,
            ).to(tl.float32)
            acc += tl.dot(x, tl.trans(w), input_precision="ieee")
        tl.store(
            out_ptr + rows[:, None] * stride_om + cols[None, :],
            acc.to(out_ptr.dtype.element_ty),
            mask=(rows[:, None] < end) & (cols[None, :] < N),
        )


def grouped_matmul(x: torch.Tensor, weights: torch.Tensor, experts: list[int], counts: list[int]) -> torch.Tensor:
    """Rows x [P, K] sorted by expert (`counts[i]` rows of expert `experts[i]`, in that order) times their expert's
    weight, weights [E, N, K] -> [P, N] in x's dtype."""
    x = x.contiguous()
    n, k = weights.shape[1], weights.shape[2]
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    if not x.shape[0]:
        return out
    block_m = 16 if max(counts) <= 16 else 32
    block_expert, block_start, block_end = [], [], []
    start = 0
    for e, c in zip(experts, counts):
        for s in range(start, start + c, block_m):
            block_expert.append(e)
            block_start.append(s)
            block_end.append(start + c)
        start += c

    def table(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.int32, device=x.device)

    block_n, block_k = 64, 32
    grid = (len(block_expert), triton.cdiv(n, block_n))
    _grouped_kernel[grid](
        x,
        weights,
        out,
        table(block_expert),
        table(block_start),
        table(block_end),
        n,
        k,
        x.stride(0),
        weights.stride(0),
        weights.stride(1),
        out.stride(0),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return out
