"""What machine a benchmark ran on: CPU, cores, memory, and its measured ceilings (memory read GB/s, fp32 GEMM
GFLOP/s), so results are reported against what the hardware can do, not as lone absolute numbers."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gb() -> float:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError):
        return 0.0


def describe() -> dict:
    return {
        "cpu": cpu_name(),
        "cores": len(os.sched_getaffinity(0)),
        "memory_gb": memory_gb(),
        "platform": platform.platform(),
    }


def measure_ceilings() -> dict:
    """Memory read bandwidth and fp32 GEMM throughput with torch on all cores (medians of a few runs), and bf16 GEMM
    throughput where the CPU computes bf16 natively (oneDNN's kernels: AMX tiles where the CPU has them), the
    ceiling of the bf16 and int8 tile kernels."""
    import torch

    def median_time(f, n: int) -> float:
        f()
        times = []
        for _ in range(n):
            t = time.perf_counter()
            f()
            times.append(time.perf_counter() - t)
        return sorted(times)[len(times) // 2]

    x = torch.ones(512 * 1024 * 1024 // 4)  # 16x the L3 of a typical part: DRAM, not cache
    bandwidth = x.numel() * 4 / median_time(lambda: x.sum(), 7) / 1e9
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    gflops = 2 * 2048**3 / median_time(lambda: a @ b, 5) / 1e9
    bf16 = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    out = {"mem_read_gbps": round(bandwidth, 1), "fp32_gemm_gflops": round(gflops, 1), "hw_bf16": bf16}
    if bf16:
        a16, b16 = a.bfloat16(), b.bfloat16()
        out["bf16_gemm_gflops"] = round(2 * 2048**3 / median_time(lambda: a16 @ b16, 5) / 1e9, 1)
    return {**out, "threads": torch.get_num_threads()}
