"""GGUF-packed weights: a GGUF file's quantized blocks kept in memory and multiplied as they are, so a forward
reads the file's bytes (Q4_K_M: ~4.9 bits per weight) rather than a dequantized copy.

A weight is a list of row ranges of one ggml type each: fused projections join the file's tensors row-wise even
where their types differ (Q4_K_M stores a layer's q/k in Q5_0 beside a Q8_0 v). On CPUs with the kernels
(tokenfab/kernels/gguf.py) rows are kept in the kernels' layout (the same bytes; Q4_0/Q5_0 rearranged, see
csrc/gguf_kernels.cpp) and every batch runs the integer kernels: their products differ from x @ dequantize().T
only by the int8 rounding of the activations (per 32 columns, as llama.cpp's Q8 blocks). Types without a kernel
and machines without the kernels dequantize and use torch's GEMM.
Dequantization reproduces gguf.quants.dequantize bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as gguf_dequantize

from tokenfab.kernels import gguf as kernels
from tokenfab.quant.base import LinearWeight, dequantized_linear


@dataclass(frozen=True, slots=True)
class PackedRows:
    """Consecutive rows of one ggml type."""

    qtype: GGMLQuantizationType
    """The file's type."""
    layout: int
    """How `data` is arranged: the type's own block layout (layout == qtype) or the kernels' repacking of it."""
    data: torch.Tensor
    """uint8 [rows, row_bytes]."""

    @property
    def rows(self) -> int:
        return self.data.shape[0]

    def dequantize(self, in_features: int, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Rows `ids` (all when None) as float32 [n, in_features]."""
        if self.layout != self.qtype or kernels.supports(self.qtype, in_features):
            return kernels.dequantize(self.layout, self.data, in_features, ids)
        data = self.data if ids is None else self.data[ids.reshape(-1)]
        values = gguf_dequantize(data.numpy(), self.qtype)
        return torch.from_numpy(values).reshape(data.shape[0], in_features)


def row_bytes(qtype: GGMLQuantizationType, in_features: int) -> int:
    block, size = GGML_QUANT_SIZES[qtype]
    if in_features % block:
        raise ValueError(f"{qtype.name} rows hold a multiple of {block} values, not {in_features}")
    return in_features // block * size


class GGUFWeight(LinearWeight):
    name = "gguf"

    def __init__(self, parts: Sequence[PackedRows], in_features: int) -> None:
        if not parts:
            raise ValueError("a GGUF weight needs at least one row range")
        self.parts = _merged(parts)
        self.in_features = in_features
        usable = all(p.layout != p.qtype or kernels.supports(p.qtype, in_features) for p in self.parts)
        self._table = kernels.SegmentTable([(p.layout, p.data) for p in self.parts]) if usable else None

    @classmethod
    def from_blocks(cls, qtype: int, data: torch.Tensor, in_features: int) -> GGUFWeight:
        """From a file tensor's raw blocks, uint8 [rows, row_bytes] (copied out of the file's memory map first)."""
        qtype = GGMLQuantizationType(qtype)
        if data.dtype != torch.uint8 or data.dim() != 2 or data.shape[1] != row_bytes(qtype, in_features):
            raise ValueError(
                f"{qtype.name} blocks of {in_features} columns must be uint8 "
                f"[rows, {row_bytes(qtype, in_features)}], got {data.dtype} {tuple(data.shape)}"
            )
        data = data.contiguous()
        if kernels.supports(qtype, in_features):
            layout, data = kernels.repack(qtype, data, in_features)
            return cls([PackedRows(qtype, layout, data)], in_features)
        return cls([PackedRows(qtype, int(qtype), data)], in_features)

    @property
    def kernel_table(self) -> kernels.SegmentTable | None:
        """The segments as the kernels take them, None where a range has no kernel (then matmul dequantizes)."""
        return self._table

    @property
    def shape(self) -> tuple[int, ...]:
        return sum(p.rows for p in self.parts), self.in_features

    @property
    def nbytes(self) -> int:
        return sum(p.data.numel() for p in self.parts)

    @property
    def types(self) -> list[str]:
        """The ggml type of each row range, e.g. ['Q5_0', 'Q8_0']."""
        return [p.qtype.name for p in self.parts]

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        # Every batch size runs the integer kernels, so a row's result never depends on its batch (prefill chunks
        # included: their sizes depend on what else the step holds). A dequantized fp32 GEMM is faster for large
        # batches on AVX2 without VNNI (benchmarks/gguf_kernels.py --rows M, 2 threads: 0.85-1.07x at 128 rows, 0.7x
        # at 512) but computes other numbers (fp32 activations).
        if self._table is not None and x.is_cpu:
            y = kernels.linear(x, self._table, self.in_features)
            return y if x.dtype == torch.float32 else y.to(x.dtype)
        return dequantized_linear(x, self)

    def dequantize_rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, end) of W in `dtype`."""
        pieces, offset = [], 0
        for p in self.parts:
            lo, hi = max(start, offset), min(end, offset + p.rows)
            if lo < hi:
                ids = None if (lo, hi) == (offset, offset + p.rows) else torch.arange(lo - offset, hi - offset)
                pieces.append(p.dequantize(self.in_features, ids))
            offset += p.rows
        out = pieces[0] if len(pieces) == 1 else torch.cat(pieces)
        return out.to(dtype)

    def dequantize(self) -> torch.Tensor:
        return self.dequantize_rows(0, self.shape[0], torch.float32)

    def embedding(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W as float32 [*ids.shape, in_features]: the token embedding lookup of a tied or stored
        embedding table, decoding only the rows asked for."""
        flat = ids.reshape(-1)
        if len(self.parts) == 1:
            out = self.parts[0].dequantize(self.in_features, flat)
        else:
            out = torch.empty(flat.numel(), self.in_features)
            offset = 0
            for p in self.parts:
                inside = (flat >= offset) & (flat < offset + p.rows)
                if inside.any():
                    out[inside] = p.dequantize(self.in_features, flat[inside] - offset)
                offset += p.rows
        return out.reshape(*ids.shape, self.in_features)

    @classmethod
    def cat_rows(cls, parts: list[GGUFWeight]) -> GGUFWeight:
        """One weight whose rows are those of `parts` in order (their packed rows, untouched)."""
        widths = {p.in_features for p in parts}
        if len(widths) != 1:
            raise ValueError(f"cannot join GGUF weights of different widths {sorted(widths)}")
        return cls([rows for p in parts for rows in p.parts], widths.pop())

    def permute_rows(self, order: torch.Tensor) -> GGUFWeight:
        """W[order]: rows moved whole, so exact in any layout (llama.cpp's q/k rope permutation is undone so)."""
        if len(self.parts) != 1:
            raise ValueError("permute a GGUF weight before joining it to others")
        p = self.parts[0]
        return GGUFWeight([PackedRows(p.qtype, p.layout, p.data[order].contiguous())], self.in_features)


def _merged(parts: Sequence[PackedRows]) -> list[PackedRows]:
    """Neighbouring ranges of one layout joined (fewer, larger kernel segments)."""
    out: list[PackedRows] = []
    for p in parts:
        if out and out[-1].layout == p.layout and out[-1].qtype == p.qtype:
            last = out.pop()
            p = PackedRows(p.qtype, p.layout, torch.cat([last.data, p.data]))
        out.append(p)
    return out
