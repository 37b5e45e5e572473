"""Stable block hashes: a chained SHA-256 over canonical CBOR, identical in every process, run and machine.

A full KV block is named by `sha256(cbor((parent_hash, token_ids, extra_keys)))`, the first block of a sequence
having the fixed root `sha256(cbor(seed))` as its parent. This is vLLM's `sha256_cbor` scheme (root seed
"vllm-none-hash" unless PYTHONHASHSEED sets another), so a hash published by tokenfab names the same block for a
vLLM peer, an llm-d or Dynamo indexer, or a router that hashes the prompt itself.

The encoder covers exactly what a block key holds (byte strings, unsigned ints, arrays, text, None) in CBOR's
canonical form (shortest heads); it is written out here because it runs for every block a request fills.
KV events carry the 64-bit form (`external_hash`): the low 8 bytes of the digest, read big-endian, as vLLM sends
them by default.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Sequence

DEFAULT_SEED = "vllm-none-hash"
"""The root's seed when PYTHONHASHSEED is unset (vLLM's DEFAULT_NONE_HASH_SEED)."""

BlockHash = bytes
"""A 32-byte SHA-256 digest."""

ExtraKeys = tuple[object, ...] | None
"""What else a block's KV depends on (adapter name, cache salt): None for plain text."""

_U8, _U16, _U32, _U64 = struct.Struct(">B"), struct.Struct(">H"), struct.Struct(">I"), struct.Struct(">Q")


def _head(out: bytearray, major: int, n: int) -> None:
    mt = major << 5
    if n < 24:
        out.append(mt | n)
    elif n < 0x100:
        out.append(mt | 24)
        out += _U8.pack(n)
    elif n < 0x10000:
        out.append(mt | 25)
        out += _U16.pack(n)
    elif n < 0x100000000:
        out.append(mt | 26)
        out += _U32.pack(n)
    else:
        out.append(mt | 27)
        out += _U64.pack(n)


def _encode(out: bytearray, value: object) -> None:
    if value is None:
        out.append(0xF6)
    elif isinstance(value, bool):
        out.append(0xF5 if value else 0xF4)
    elif isinstance(value, int):
        if value >= 0:
            _head(out, 0, value)
        else:
            _head(out, 1, -1 - value)
    elif isinstance(value, bytes):
        _head(out, 2, len(value))
        out += value
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        _head(out, 3, len(raw))
        out += raw
    elif isinstance(value, (tuple, list)):
        _head(out, 4, len(value))
        for item in value:
            _encode(out, item)
    else:
        raise TypeError(f"a block key cannot hold {type(value).__name__}")


def cbor(value: object) -> bytes:
    """Canonical CBOR of a block key (the subset of types a key holds)."""
    out = bytearray()
    _encode(out, value)
    return bytes(out)


def sha256_cbor(value: object) -> bytes:
    return hashlib.sha256(cbor(value)).digest()


def root_hash(seed: str | None = None) -> BlockHash:
    """The parent of every sequence's first block: from `seed`, else PYTHONHASHSEED, else DEFAULT_SEED."""
    if seed is None:
        seed = os.environ.get("PYTHONHASHSEED") or DEFAULT_SEED
    return sha256_cbor(seed)


ROOT = root_hash()


def block_hash(parent: BlockHash | None, token_ids: Sequence[int], extra_keys: ExtraKeys = None) -> BlockHash:
    """The hash of one full block; parent None means the sequence's first block."""
    out = bytearray(b"\x83")  # array of three: parent, tokens, extra keys
    parent = ROOT if parent is None else parent
    _head(out, 2, len(parent))
    out += parent
    _head(out, 4, len(token_ids))
    for t in token_ids:
        _head(out, 0, t)
    _encode(out, extra_keys)
    return hashlib.sha256(out).digest()


def block_hashes(
    token_ids: Sequence[int], block_size: int, extra_keys: ExtraKeys = None, parent: BlockHash | None = None
) -> list[BlockHash]:
    """The chain over every full block of `token_ids` (a router or indexer hashing a prompt)."""
    hashes: list[BlockHash] = []
    for i in range(len(token_ids) // block_size):
        parent = block_hash(parent, token_ids[i * block_size : (i + 1) * block_size], extra_keys)
        hashes.append(parent)
    return hashes


def external_hash(h: BlockHash) -> int:
    """The 64-bit form KV events carry: the digest's last 8 bytes, big-endian."""
    return int.from_bytes(h[-8:], "big")
