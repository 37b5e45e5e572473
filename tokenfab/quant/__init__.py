"""Weight formats: how a linear layer stores W and computes x W^T (dense, packed, quantized)."""

from tokenfab.quant.base import LinearWeight, QuantizedWeight
from tokenfab.quant.fp8 import FP8Weight
from tokenfab.quant.int4 import Int4Weight
from tokenfab.quant.int8 import Int8Weight
from tokenfab.quant.nvfp4 import NVFP4Weight
from tokenfab.quant.registry import QUANTIZED_FORMATS, WEIGHT_FORMATS, build_weight

__all__ = [
    "FP8Weight",
    "Int4Weight",
    "Int8Weight",
    "LinearWeight",
    "NVFP4Weight",
    "QUANTIZED_FORMATS",
    "QuantizedWeight",
    "WEIGHT_FORMATS",
    "build_weight",
]
