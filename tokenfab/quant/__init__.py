"""Weight formats: how a linear layer stores W and computes x W^T (dense, packed, quantized)."""

from tokenfab.quant.base import LinearWeight
from tokenfab.quant.registry import WEIGHT_FORMATS, build_weight

__all__ = ["WEIGHT_FORMATS", "LinearWeight", "build_weight"]
