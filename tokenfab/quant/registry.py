"""Weight formats by name: the `--quantization` choices and how each is built from a float weight."""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenfab.quant.base import LinearWeight
from tokenfab.quant.bf16 import BF16Weight
from tokenfab.quant.dense import (
    DenseWeight,
    OneDNNPackedWeight,
    onednn_packing_supported,
)


def _dense(weight: torch.Tensor) -> LinearWeight:
    if onednn_packing_supported(weight):
        return OneDNNPackedWeight(weight)
    return DenseWeight(weight)


WEIGHT_FORMATS: dict[str, Callable[[torch.Tensor], LinearWeight]] = {
    "none": _dense,
    "bf16": BF16Weight.quantize,
}
"""Builders from a float weight [out, in] (already in the model's dtype, on its device)."""


def build_weight(fmt: str, weight: torch.Tensor) -> LinearWeight:
    try:
        builder = WEIGHT_FORMATS[fmt]
    except KeyError:
        raise ValueError(f"unknown weight format {fmt!r} (choose from {', '.join(WEIGHT_FORMATS)})") from None
    return builder(weight)
