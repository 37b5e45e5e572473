"""The Triton W4A16 kernel against the dequantized reference: under TRITON_INTERPRET=1 on the CPU (a subprocess,
since the interpreter is chosen when kernels are defined), and on a GPU where one is present."""

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")

CHECK = textwrap.dedent("""
    import sys, torch
    from tokenfab.quant import Int4Weight, NVFP4Weight
    from tokenfab.quant import triton_gemm
    device = sys.argv[1]
    g = torch.Generator().manual_seed(0)
    for cls, fn in ((NVFP4Weight, triton_gemm.nvfp4_matmul), (Int4Weight, triton_gemm.int4_matmul)):
        # N and M not multiples of the tiles; K = 3.5 tiles of 64; fused rows with two global scales
        parts = [cls.quantize(torch.randn(n, 224, generator=g) * s) for n, s in ((70, 0.05), (33, 2.0))]
        w = cls.cat_rows(parts)
        for attr in ("packed", "block_scale", "global_scale", "scales"):
            if hasattr(w, attr):
                setattr(w, attr, getattr(w, attr).to(device))
        for rows, dtype in ((1, torch.float32), (5, torch.float32), (37, torch.float32), (5, torch.float16)):
            x = torch.randn(rows, 224, generator=g).to(device, dtype)
            y = fn(x, w)
            ref = torch.nn.functional.linear(x.double(), w.dequantize().double())
            err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
            tol = 1e-5 if dtype == torch.float32 else 2e-3
            assert y.dtype == dtype and y.shape == (rows, 103), (y.dtype, y.shape)
            assert err < tol, (cls.name, rows, dtype, err)
        if device == "cuda":
            assert torch.equal(w.matmul(x), fn(x, w))  # the format's matmul takes the kernel on CUDA
    print("ok")
""")


def run_check(device: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CHECK, device], capture_output=True, text=True, timeout=600,
                          env={**os.environ, **env})


def test_kernel_matches_the_reference_under_the_interpreter():
    proc = run_check("cpu", {"TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_kernel_matches_the_reference_on_the_gpu():
    proc = run_check("cuda", {})
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


@pytest.mark.skipif(not (torch.cuda.is_available() and hasattr(torch, "float4_e2m1fn_x2")
                         and torch.cuda.get_device_capability() >= (10, 0)), reason="no Blackwell GPU (native FP4)")
def test_native_fp4_gemm_agrees_with_the_kernel():
    from tokenfab.quant import NVFP4Weight
    from tokenfab.quant.native_fp4 import nvfp4_scaled_mm

    w = NVFP4Weight.quantize(torch.randn(256, 512, device="cuda") * 0.05)
    x = torch.randn(16, 512, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), w.dequantize())
    assert ((nvfp4_scaled_mm(x, w).float() - ref).abs().max() / ref.abs().max()).item() < 0.1


def test_blocked_scale_layout_places_each_128x4_tile_as_32x16():
    from tokenfab.quant.native_fp4 import to_blocked

    scales = torch.arange(256 * 8, dtype=torch.float32).view(256, 8)
    blocked = to_blocked(scales).view(-1, 32, 16)
    assert blocked.shape == (4, 32, 16)
    # tile (row block 0, col block 1): element (r, c) sits at [r % 32, (r // 32) * 4 + c]
    tile = blocked[1]
    for r, c in ((0, 0), (37, 2), (127, 3)):
        assert tile[r % 32, (r // 32) * 4 + c] == scales[r, 4 + c]
    padded = to_blocked(torch.ones(3, 5)).view(-1, 32, 16)
    assert padded.shape == (2, 32, 16) and padded.sum() == 15
