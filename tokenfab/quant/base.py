"""LinearWeight: the one interface every weight format implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, Protocol, Self

import torch
import torch.nn.functional as F


class LinearWeight(ABC):
    """A linear layer's weight W [out_features, in_features] in some storage format, and y = x W^T over it.

    matmul takes x [M, in_features] in the model's activation dtype and returns [M, out_features] in the same
    dtype; the bias is the layer's business. dequantize is the reference every fast path is tested against.
    """

    name: ClassVar[str]

    @property
    @abstractmethod
    def shape(self) -> tuple[int, ...]: ...

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes one forward reads from this weight."""

    @abstractmethod
    def matmul(self, x: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """W as float32 [out_features, in_features]."""


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class QuantizedWeight(LinearWeight):
    """A quantized format: every stored tensor is laid out by output row, so fused projections (q/k/v, gate/up)
    are the row-wise concatenation of their shards, and a checkpoint stores the same tensors per projection."""

    @classmethod
    @abstractmethod
    def quantize(cls, weight: torch.Tensor) -> QuantizedWeight:
        """From a float weight [out, in] (fp32/bf16/fp16)."""

    @classmethod
    def supports(cls, shape: tuple[int, ...]) -> bool:
        """Whether a weight of this shape can be stored in the format (else the layer stays dense)."""
        return True

    @abstractmethod
    def dequantize_rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor:
        """Rows [start, end) of W in `dtype`."""

    def dequantize(self) -> torch.Tensor:
        return self.dequantize_rows(0, self.shape[0], torch.float32)

    @abstractmethod
    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors saved under `<module>.<key>` in a checkpoint (see tokenfab.quant.checkpoint)."""

    @classmethod
    @abstractmethod
    def from_checkpoint_tensors(cls, tensors: dict[str, torch.Tensor], config: dict) -> QuantizedWeight:
        """Inverse of checkpoint_tensors; `config` is the checkpoint's quantization_config."""

    @classmethod
    @abstractmethod
    def cat_rows(cls, parts: list[Self]) -> Self:
        """One weight whose rows are those of `parts` in order (exact: no requantization)."""


# Elements dequantized at once by the reference matmul: ~16 MB of fp32, so the LM head (262k x 640) never
# materializes whole.
DEQUANT_CHUNK_ELEMENTS = 1 << 22


def row_chunks(num_rows: int, row_elements: int, budget: int = 1 << 16) -> list[tuple[int, int]]:
    """[start, end) row ranges of about `budget` elements: quantizers work chunk by chunk so their many
    elementwise passes stay in cache (3-5x faster than whole-tensor passes here)."""
    rows = max(1, budget // max(1, row_elements))
    return [(s, min(s + rows, num_rows)) for s in range(0, num_rows, rows)]


class GGUFRows(Protocol):
    """A weight that dequantizes row ranges (what dequantized_linear needs)."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def dequantize_rows(self, start: int, end: int, dtype: torch.dtype) -> torch.Tensor: ...


def dequantized_linear(x: torch.Tensor, weight: QuantizedWeight | GGUFRows) -> torch.Tensor:
    """Reference y = x W^T: dequantize a block of output rows at a time into x's dtype, then F.linear."""
    out_features, in_features = weight.shape
    rows = max(1, DEQUANT_CHUNK_ELEMENTS // in_features)
    if out_features <= rows:
        return F.linear(x, weight.dequantize_rows(0, out_features, x.dtype))
    out = x.new_empty(*x.shape[:-1], out_features)
    for start in range(0, out_features, rows):
        end = min(start + rows, out_features)
        out[..., start:end] = F.linear(x, weight.dequantize_rows(start, end, x.dtype))
    return out
