"""Weight formats by name: the `--quantization` choices and how each is built from a float weight."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenfab.quant.base import LinearWeight, QuantizedWeight
from tokenfab.quant.bf16 import BF16ActWeight, BF16Weight
from tokenfab.quant.dense import DenseWeight, OneDNNPackedWeight, onednn_packing_supported
from tokenfab.quant.fp8 import FP8Weight
from tokenfab.quant.int4 import Int4Weight
from tokenfab.quant.int8 import Int8Weight
from tokenfab.quant.nvfp4 import NVFP4Weight


def _dense(weight: torch.Tensor) -> LinearWeight:
    if onednn_packing_supported(weight):
        return OneDNNPackedWeight(weight)
    return DenseWeight(weight)


QUANTIZED_FORMATS: dict[str, type[QuantizedWeight]] = {
    "nvfp4": NVFP4Weight,
    "fp8": FP8Weight,
    "int8": Int8Weight,
    "int4": Int4Weight,
}


def _quantized(cls: type[QuantizedWeight]) -> Callable[[torch.Tensor], LinearWeight]:
    def build(weight: torch.Tensor) -> LinearWeight:
        # A shape the format cannot block (e.g. in_features not a multiple of the group) stays dense.
        return cls.quantize(weight) if cls.supports(tuple(weight.shape)) else _dense(weight)

    return build


WEIGHT_FORMATS: dict[str, Callable[[torch.Tensor], LinearWeight]] = {
    "none": _dense,
    "bf16": BF16Weight.quantize,
    "bf16-act": BF16ActWeight.quantize,
    **{name: _quantized(cls) for name, cls in QUANTIZED_FORMATS.items()},
    # A GGUF file's own blocks, which tokenfab.models.loading keeps packed; a layer that still reaches a builder
    # arrived as floats (a type without a kernel in the file) and stays dense.
    "gguf": _dense,
}
"""Builders from a float weight [out, in] (already in the model's dtype, on its device)."""


def build_weight(fmt: str, weight: torch.Tensor) -> LinearWeight:
    try:
        builder = WEIGHT_FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown weight format {fmt!r} (choose from {', '.join(WEIGHT_FORMATS)})") from None
    return builder(weight)
