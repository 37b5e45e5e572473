"""Two 4-bit codes per byte, the even column in the low nibble (the layout of ModelOpt NVFP4 and of int4 here)."""

from __future__ import annotations

import torch


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes in [0, 16) of shape [..., K] (K even) -> uint8 [..., K/2]."""
    if codes.shape[-1] % 2:
        raise ValueError(f"cannot pack an odd number of columns ({codes.shape[-1]})")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K/2] -> uint8 codes [..., K]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def byte_table(values: torch.Tensor) -> torch.Tensor:
    """[256, 2] table: the decoded (low, high) nibble values of every byte, for a 16-entry code -> value table.
    Indexing it with packed bytes decodes two columns per lookup."""
    byte = torch.arange(256)
    return torch.stack((values[byte & 0xF], values[byte >> 4]), dim=-1)


def decode_bytes(packed: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """uint8 [N, K/2] through a byte_table -> [N, K] in the table's dtype."""
    return table[packed.long()].flatten(-2)
