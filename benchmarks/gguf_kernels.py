"""GGUF block kernels: achieved GB/s per format at Gemma 3 270M's shapes, against the machine's read ceiling.

    .venv/bin/python benchmarks/gguf_kernels.py [--rows 1] [--seconds 1.0] [--threads 2]

The ceiling is `torch.ones(128M).sum()` (512 MB read) measured in the same run. Each shape is timed over a pool of
distinct random matrices of ~256 MB together, cycled, so every call streams its weight from DRAM as decode does
(the whole model is 247 MB, far beyond the L3); the LM head (262144 x 640 Q8_0, 178 MB) is one matrix. With
--rows > 1 the dequantize-then-GEMM alternative (torch fp32) is timed beside the kernel.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tokenfab.kernels import gguf as kernels  # noqa: E402

SHAPES = [  # (name, [(type, rows)...] fused segments, K)
    ("qkv Q5_0+Q5_0+Q8_0", [(T.Q5_0, 1280), (T.Q8_0, 256)], 640),
    ("q Q5_0", [(T.Q5_0, 1024)], 640),
    ("gate_up Q5_0", [(T.Q5_0, 4096)], 640),
    ("o Q4_K", [(T.Q4_K, 640)], 1024),
    ("down Q4_K", [(T.Q4_K, 640)], 2048),
    ("down Q6_K", [(T.Q6_K, 640)], 2048),
    ("down Q5_K", [(T.Q5_K, 640)], 2048),
    ("gate_up Q4_0", [(T.Q4_0, 4096)], 640),
    ("gate_up Q8_0", [(T.Q8_0, 4096)], 640),
    ("lm_head Q8_0", [(T.Q8_0, 262144)], 640),
    # ~100 MB of one format in one call: the format's streaming rate without per-call costs.
    ("stream Q5_0", [(T.Q5_0, 229376)], 640),
    ("stream Q4_K", [(T.Q4_K, 86016)], 2048),
    ("stream Q5_K", [(T.Q5_K, 57344)], 2048 + 1024),
    ("stream Q6_K", [(T.Q6_K, 59392)], 2048),
]
FP16_FIELDS = {T.Q4_0: [0], T.Q5_0: [0], T.Q8_0: [0], T.Q4_K: [0, 2], T.Q5_K: [0, 2], T.Q6_K: [208]}
POOL_BYTES = 256 << 20


def random_blocks(qtype: T, rows: int, K: int, rng: np.random.Generator) -> torch.Tensor:
    block, size = GGML_QUANT_SIZES[qtype]
    b = rng.integers(0, 256, size=(rows, K // block, size), dtype=np.uint8)
    for off in FP16_FIELDS[qtype]:
        scales = (rng.standard_normal((rows, K // block)) * 0.01).astype(np.float16)
        b[:, :, off:off + 2] = scales.view(np.uint8).reshape(rows, K // block, 2)
    return torch.from_numpy(b.reshape(rows, -1))


def ceiling(seconds: float) -> float:
    x = torch.ones(128 << 20)
    x.sum()
    best, start = 0.0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        x.sum()
        best = max(best, x.numel() * 4 / (time.perf_counter() - t))
    return best / 1e9


def timed(fn, calls_per_round: int, seconds: float) -> float:
    """Best seconds per call over rounds of `calls_per_round` calls (the first round warms up)."""
    fn(0)
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for i in range(calls_per_round):
            fn(i)
        best = min(best, (time.perf_counter() - t) / calls_per_round)
    return best


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1, help="M, rows of x")
    p.add_argument("--seconds", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", default=None, help="substring of the shape names to run")
    p.add_argument("--pool-mb", type=float, default=POOL_BYTES / 2**20,
                   help="distinct weights cycled per shape (small: cache-resident, i.e. the kernels' compute rate)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    peak = ceiling(args.seconds)
    print(f"read ceiling (torch.ones(128M).sum()): {peak:.1f} GB/s; M = {args.rows}, {args.threads} threads")
    for name, segments, K in SHAPES:
        if args.only and args.only not in name:
            continue
        one = sum(r * K // GGML_QUANT_SIZES[t][0] * GGML_QUANT_SIZES[t][1] for t, r in segments)
        count = max(1, int(args.pool_mb * 2**20) // one)
        pool = [kernels.SegmentTable([kernels.repack(t, random_blocks(t, r, K, rng), K) for t, r in segments])
                for _ in range(count)]
        x = torch.randn(args.rows, K)
        sec = timed(lambda i: kernels.linear(x, pool[i % count], K), count, args.seconds)
        line = f"{name:22s} K={K:5d} {one / 1e6:7.2f} MB  {sec * 1e6:9.1f} us  {one / sec / 1e9:5.1f} GB/s " \
               f"({one / sec / 1e9 / peak:4.2f} of ceiling)"
        if args.rows > 1:
            def dense(i: int) -> None:
                table = pool[i % count]
                w = torch.cat([kernels.dequantize(layout, d, K) for layout, d in table.segments])
                torch.nn.functional.linear(x, w)
            dsec = timed(dense, min(count, 8), args.seconds)
            line += f"  | dequant+GEMM {dsec * 1e6:9.1f} us ({dsec / sec:4.2f}x kernel time)"
        print(line, flush=True)


if __name__ == "__main__":
    main()
