"""The CPU's instruction-set levels and which one tokenfab's kernels run: detected from the CPU's flags, capped by
TOKENFAB_CPU_ISA.

A level is a set of CPU flags plus the compiler flags that target it; the kernels are built once per level with
those flags (never -march=native), so a library names what it was built for and runs on any CPU that has the level.
Levels are listed best first; the kernels take the best one the CPU has unless TOKENFAB_CPU_ISA names another.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cache
from pathlib import Path

ISA_ENV = "TOKENFAB_CPU_ISA"


@dataclass(frozen=True, slots=True)
class IsaLevel:
    name: str
    cpu_flags: tuple[str, ...]
    """/proc/cpuinfo flags the level needs."""
    compiler_flags: tuple[str, ...]
    """What the compiler targets for it (also the build key)."""
    what: str
    """What the kernels do differently at this level."""
    split_formats: tuple[str, ...] = ()
    """Weight formats whose products this level computes over x split into two bf16 terms (AMX tiles, vdpbf16ps):
    within TILE_TOLERANCE of the lower levels' result, and each row's result the same bits at every batch size."""
    bf16_activations: bool = False
    """Whether the `bf16-act` weight format takes x as bf16 here (one term, vLLM's precision: within BF16_TOLERANCE
    of the fp32 result, each row the same bits at every batch size); elsewhere it computes as `bf16`."""


_AVX2 = ("avx2", "fma", "f16c")
_AVX512 = ("avx512f", "avx512bw", "avx512vl", "avx512dq")
_GCC_AVX2 = ("-mavx2", "-mfma", "-mf16c")
_GCC_AVX512 = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq")
_VNNI512 = (*_AVX2, *_AVX512, "avx512_vnni")
_GCC_VNNI512 = (*_GCC_AVX2, *_GCC_AVX512, "-mavx512vnni")

LEVELS: tuple[IsaLevel, ...] = (
    IsaLevel(
        "amx",
        (*_VNNI512, "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8"),
        (*_GCC_VNNI512, "-mavx512bf16", "-mamx-tile", "-mamx-bf16", "-mamx-int8"),
        "bf16 weights (x split into two bf16 terms) and int8 weights (W8A8) on AMX tiles; otherwise as avx512_vnni",
        ("bf16", "W8A8"),
    ),
    IsaLevel(
        "avx512_bf16",
        (*_VNNI512, "avx512_bf16"),
        (*_GCC_VNNI512, "-mavx512bf16"),
        "bf16 weights with vdpbf16ps (x split into two bf16 terms, or rounded to bf16 for bf16-act); otherwise as "
        "avx512_vnni",
        ("bf16",),
        bf16_activations=True,
    ),
    IsaLevel("avx512_vnni", _VNNI512, _GCC_VNNI512, "16-lane fp32 GEMM tiles; int8 dot products with vpdpbusd"),
    IsaLevel("avx512", _AVX2 + _AVX512, _GCC_AVX2 + _GCC_AVX512, "16-lane fp32 GEMM tiles"),
    IsaLevel(
        "avx2_vnni",
        _AVX2 + ("avx_vnni",),
        _GCC_AVX2 + ("-mavxvnni",),
        "8-lane fp32 tiles; int8 dot products with vpdpbusd (VEX)",
    ),
    IsaLevel("avx2", _AVX2, _GCC_AVX2, "8-lane fp32 tiles; int8 dot products with vpmaddubsw"),
)
"""Best first. Every level from avx512_vnni down computes the same numbers: the float kernels accumulate in one order
on all of them and the integer dot products are exact, so the choice changes speed only. A level's split_formats
(bf16-weight products with x carried to 16 significand bits; on amx also int8-weight W8A8 products, the same exact
block dot products summed per block rather than per lane) and amx's attention on tiles run in their own order,
within TILE_TOLERANCE of what the lower levels compute; every other format computes what the lower levels compute.
On every level each row's result is the same bits at every batch size, and a token's attention the same bits in a
prefill chunk as when it decodes."""

TILE_LEVELS = frozenset({"amx"})
"""Levels with AMX tiles: their split formats run on tiles, and so does attention (see TILE_ATTENTION_DIM)."""
TILE_TOLERANCE = 2e-5
"""Largest difference from the lower levels' result, relative to the output's scale, of a product on AMX tiles."""
BF16_TOLERANCE = 2**-8
"""Largest difference from the fp32 result, relative to the output's scale, of a product with x rounded to bf16."""
TILE_ATTENTION_DIM = 32
"""A tile level also runs attention on tiles (queries, keys, values and weights split into two bf16 terms, within
TILE_TOLERANCE) for head dims that are a multiple of this with at most 16 query heads per kv head."""


def level(name: str) -> IsaLevel:
    for lv in LEVELS:
        if lv.name == name:
            return lv
    raise ValueError(f"unknown CPU ISA level {name!r}; choose one of {', '.join(lv.name for lv in LEVELS)}")


@cache
def cpu_flags() -> frozenset[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def supported(flags: frozenset[str] | None = None) -> list[IsaLevel]:
    """The levels this CPU runs, best first."""
    flags = cpu_flags() if flags is None else flags
    return [lv for lv in LEVELS if all(f in flags for f in lv.cpu_flags)]


@dataclass(frozen=True, slots=True)
class IsaChoice:
    level: IsaLevel | None
    """None: no level runs here (the torch paths run instead)."""
    reason: str


def choose(requested: str | None = None, flags: frozenset[str] | None = None) -> IsaChoice:
    """The level the kernels run: `requested` (default: $TOKENFAB_CPU_ISA) if the CPU has it, else the best it has.
    A requested level the CPU lacks is an error, not a silent fallback."""
    if requested is None:
        requested = os.environ.get(ISA_ENV) or None
    flags = cpu_flags() if flags is None else flags
    levels = supported(flags)
    if requested is not None:
        wanted = level(requested)
        if wanted not in levels:
            missing = sorted(set(wanted.cpu_flags) - flags)
            raise ValueError(f"{ISA_ENV}={requested}: this CPU lacks {', '.join(missing)}")
        return IsaChoice(wanted, f"{ISA_ENV}={requested}")
    if not levels:
        return IsaChoice(None, f"CPU lacks {', '.join(f for f in _AVX2 if f not in flags)}")
    return IsaChoice(levels[0], "the best level this CPU has")


def vector_flags() -> list[str]:
    """The CPU's vector-extension flags (AVX*, AMX*, FMA, F16C)."""
    return sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))


def describe() -> dict[str, object]:
    """The CPU's vector flags and the levels it supports, for logs and benchmark records."""
    return {"cpu_flags": vector_flags(), "isa_levels": [lv.name for lv in supported()]}
