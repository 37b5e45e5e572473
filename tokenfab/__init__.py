"""tokenfab: LLM inference built around cost per token."""

import os

# Spinning OpenMP workers make every torch op up to ~100x slower as soon as any other process wants a core (small
# or shared machines); waiting passively measured the same on an idle machine. Must be set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# ...but sleeping at once costs a futex wake-up on each of the ~150 parallel kernel calls of a decode step; a short
# bounded spin first measured 5-8% faster batch-1 decode (bf16, 2 cores) and still yields the core soon after.
os.environ.setdefault("GOMP_SPINCOUNT", "200000")
# Weights are streamed from memory once per decode step; on 4 KiB pages the walk over them costs ~15% of the
# bandwidth (bf16 GEMV over a 335 MB matrix: 25 -> 29 GB/s with transparent huge pages). torch asks for huge
# pages on large CPU allocations when this is set before its first one.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from tokenfab.config import EngineConfig, SpeculativeConfig  # noqa: E402
from tokenfab.engine.types import CompletionOutput, RequestOutput, SamplingParams  # noqa: E402
from tokenfab.llm import LLM  # noqa: E402

__all__ = ["LLM", "SamplingParams", "EngineConfig", "SpeculativeConfig", "RequestOutput", "CompletionOutput"]
from tokenfab.version import __version__  # noqa: E402

__all__ += ["__version__"]
