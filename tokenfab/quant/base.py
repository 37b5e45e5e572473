"""LinearWeight: the one interface every weight format implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch


class LinearWeight(ABC):
    """A linear layer's weight W [out_features, in_features] in some storage format, and y = x W^T over it.

    matmul takes x [M, in_features] in the model's activation dtype and returns [M, out_features] in the same
    dtype; the bias is the layer's business. dequantize is the reference every fast path is tested against.
    """

    name: ClassVar[str]

    @property
    @abstractmethod
    def shape(self) -> tuple[int, int]: ...

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
