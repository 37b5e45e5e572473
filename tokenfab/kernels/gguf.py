"""Typed wrappers over the GGUF block kernels (csrc/gguf_kernels.cpp): packed rows in, float32 out.

A weight is one or more consecutive row ranges ("segments"), each a uint8 tensor [rows, row_bytes] in one
layout: a ggml type's own block layout, or the kernels' repacking of it (`repack`: same bytes, the bits of every
value unchanged, arranged for fewer instructions per weight). A fused projection whose parts the file stores in
different types (Gemma's Q5_0 q/k beside a Q8_0 v) is a single call. Callers check `supports` and fall back to
torch otherwise.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence

import torch
from gguf import GGMLQuantizationType as T

from tokenfab.kernels.build import library, load_library
from tokenfab.kernels.cpu import launch

KERNEL_TYPES = frozenset({T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K})
"""ggml types with a kernel (activations int8 per 32 columns, exact int32 dot products)."""


def available() -> bool:
    return load_library() is not None


def supports(qtype: int, K: int) -> bool:
    """Whether the kernels run rows of K values of this ggml type (K-quants need K % 256 == 0, the rest K % 32)."""
    lib = load_library()
    return lib is not None and qtype in KERNEL_TYPES and lib.tf_gguf_row_bytes(int(qtype), K) > 0


def repack(qtype: int, data: torch.Tensor, K: int) -> tuple[int, torch.Tensor]:
    """(layout, rows) the kernels run fastest for a ggml type's rows [rows, row_bytes]: the data itself where the
    file's layout is already that (K-quants, Q8_0), else a repacked copy of the same size."""
    _check(data)
    out = torch.empty_like(data)
    layout = library().tf_gguf_repack(
        int(qtype), data.data_ptr(), out.data_ptr(), data.shape[0], K, torch.get_num_threads()
    )
    if layout == 0:
        raise ValueError(f"no kernel for ggml type {qtype} with {K} columns")
    return (layout, out) if layout != qtype else (layout, data)


class SegmentTable:
    """The ctypes view of a weight's segments, built once so a call passes three pointers."""

    def __init__(self, segments: Sequence[tuple[int, torch.Tensor]]) -> None:
        for _, data in segments:
            _check(data)
        count = len(segments)
        self.count = count
        self.layouts = (ctypes.c_int32 * count)(*(int(t) for t, _ in segments))
        self.rows = (ctypes.c_int64 * count)(*(d.shape[0] for _, d in segments))
        self.data = (ctypes.c_void_p * count)(*(d.data_ptr() for _, d in segments))
        self.segments = list(segments)  # keeps the memory behind the pointers alive
        self.out_features = sum(d.shape[0] for _, d in segments)
        self.call = library().tf_gguf_linear


def linear(x: torch.Tensor, table: SegmentTable, K: int) -> torch.Tensor:
    """x [..., K] (float32, else converted) times the segments' rows: float32 [..., N]."""
    return launch(table.call, x, table.out_features, K, table.count, table.layouts, table.rows, table.data)


def dequantize(layout: int, data: torch.Tensor, K: int, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Rows `ids` (all rows when None) of data [rows, row_bytes] in `layout` as float32 [n, K], bit-exact with
    gguf.quants.dequantize of the file's rows. Ids are checked: they index raw memory."""
    _check(data)
    index = None
    if ids is not None:
        index = ids.reshape(-1).to(torch.int64).contiguous()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= data.shape[0]):
            raise IndexError(f"row ids out of range [0, {data.shape[0]})")
    n = data.shape[0] if index is None else index.numel()
    out = torch.empty(n, K, dtype=torch.float32)
    library().tf_gguf_dequantize(
        int(layout),
        data.data_ptr(),
        None if index is None else index.data_ptr(),
        n,
        K,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def _check(data: torch.Tensor) -> None:
    if data.dtype != torch.uint8 or data.dim() != 2 or not data.is_contiguous():
        raise ValueError("packed rows must be contiguous uint8 [rows, row_bytes]")
