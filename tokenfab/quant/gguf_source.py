"""A GGUF file's tensors split for loading: the ones to keep packed become GGUFWeights, the rest are dequantized.

Tensors are grouped (by the caller: a fused linear layer's q/k/v or gate/up parts form one group) and a group
stays packed only when every member's type has a kernel, since a fused layer has one storage format; other
groups, norms and unsupported types load as float tensors like any checkpoint's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator

import numpy as np
import torch

from tokenfab.kernels.gguf import KERNEL_TYPES
from tokenfab.loader.gguf_reader import GGUFEntry, iter_gguf_entries, unpermute_rope_rows
from tokenfab.quant.gguf_packed import GGUFWeight


class GGUFPackedSplitter:
    """`group_of(hf_name)` names the group a tensor would stay packed with, or None to dequantize it."""

    def __init__(self, path: str | os.PathLike[str], group_of: Callable[[str], str | None]) -> None:
        self._entries = list(iter_gguf_entries(path))
        groups: dict[str, list[GGUFEntry]] = {}
        for entry in self._entries:
            group = group_of(entry.hf_name)
            if group is not None:
                groups.setdefault(group, []).append(entry)
        self._packed = {e.hf_name for members in groups.values() if all(map(packable, members)) for e in members}
        self._built: dict[str, GGUFWeight] = {}

    def plain(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Float tensors by HF name; the packed ones are kept aside for `built`."""
        for entry in self._entries:
            if entry.hf_name in self._packed:
                self._built[entry.hf_name.removesuffix(".weight")] = packed_weight(entry)
            else:
                yield entry.hf_name, entry.values()

    def built(self) -> dict[str, GGUFWeight]:
        """HF module name -> its packed weight (call after `plain` is exhausted)."""
        return self._built


def packable(entry: GGUFEntry) -> bool:
    return (
        entry.tensor.tensor_type in KERNEL_TYPES
        and len(entry.shape) == 2
        and entry.norm_offset == 0
        and entry.hf_name.endswith(".weight")
    )


def packed_weight(entry: GGUFEntry) -> GGUFWeight:
    """The entry's blocks copied out of the file's memory map, rows in HF order."""
    rows, cols = entry.shape
    data = torch.from_numpy(np.array(entry.tensor.data, dtype=np.uint8, copy=True).reshape(rows, -1))
    weight = GGUFWeight.from_blocks(entry.tensor.tensor_type, data, cols)
    if entry.rope_heads is not None:
        order = unpermute_rope_rows(np.arange(rows)[:, None], entry.rope_heads)[:, 0]
        weight = weight.permute_rows(torch.from_numpy(order))
    return weight
