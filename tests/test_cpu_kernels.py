"""The C++ CPU kernels against torch references: every weight format, decode and panel paths, row tails."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenfab.kernels import build
from tokenfab.kernels import cpu as kernels
from tokenfab.platform import cpu_isa

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels need g++ and AVX2/FMA/F16C")

SHAPES = [(1, 8, 16), (1, 37, 640), (2, 1027, 64), (3, 64, 256), (4, 29, 128), (5, 1000, 640), (7, 33, 64),
          (8, 30, 64), (17, 50, 96), (24, 49, 640), (33, 70, 2048)]
"""(M, N, K): decode sizes (register path), M >= 8 (GEMM path: groups of 16 rows and a last one of 8, row tiles of
6 and panels of 24 weight rows with tails), N not a multiple of the 4-row block."""


def _close(y: torch.Tensor, ref: torch.Tensor) -> None:
    # fp32 accumulation in a different order than torch's GEMM: relative to the output scale.
    scale = ref.abs().max().clamp_min(1e-6)
    assert ((y - ref).abs().max() / scale).item() < 2e-5


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_bf16_linear_matches_widened_weight(M: int, N: int, K: int) -> None:
    g = torch.Generator().manual_seed(M * N + K)
    x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g).bfloat16()
    _close(kernels.linear_bf16(x, w), x @ w.float().t())
    assert torch.equal(kernels.dequant_bf16(w), w.float())


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_int8_linear_applies_row_scales(M: int, N: int, K: int) -> None:
    g = torch.Generator().manual_seed(M + N * K)
    x = torch.randn(M, K, generator=g)
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, generator=g) / 100
    w = q.float() * scale[:, None]
    _close(kernels.linear_int8(x, q, scale), x @ w.t())
    assert torch.equal(kernels.dequant_int8(q, scale), w)


def test_fp8_decode_is_exact_for_every_code() -> None:
    codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]  # e4m3fn's two NaN codes
    w = codes.view(torch.float8_e4m3fn).reshape(2, -1)[:, :120].contiguous()
    scale = torch.tensor([1.0, 0.5])
    assert torch.equal(kernels.dequant_fp8(w, scale), w.float() * scale[:, None])


@pytest.mark.parametrize("M,N,K", SHAPES)
def test_fp8_linear(M: int, N: int, K: int) -> None:
    g = torch.Generator().manual_seed(N + K)
    x = torch.randn(M, K, generator=g)
    w = (torch.randn(N, K, generator=g) * 40).to(torch.float8_e4m3fn)
    scale = torch.rand(N, generator=g) + 0.5
    _close(kernels.linear_fp8(x, w, scale), x @ (w.float() * scale[:, None]).t())


def _pack(codes: torch.Tensor) -> torch.Tensor:
    """codes [N, K] in 0..15 -> [N, K/2] bytes, even column in the low nibble."""
    c = codes.to(torch.uint8)
    return (c[:, 0::2] | (c[:, 1::2] << 4)).contiguous()


@pytest.mark.parametrize("table,mult,group", [(kernels.E2M1_DOUBLED, 0.5, 16), (kernels.INT4_TWOS_COMPLEMENT, 1.0, 32)])
@pytest.mark.parametrize("M,N,K", [s for s in SHAPES if s[2] % 32 == 0])
def test_lut4_linear_decodes_codes_scales_and_row_scales(table: torch.Tensor, mult: float, group: int,
                                                         M: int, N: int, K: int) -> None:
    g = torch.Generator().manual_seed(M * 7 + N + K)
    codes = torch.randint(0, 16, (N, K), generator=g)
    scales = (torch.rand(N, K // group, generator=g) + 0.1).half()
    rows = torch.rand(N, generator=g) + 0.5
    w = table[codes].float() * mult * scales.float().repeat_interleave(group, dim=1) * rows[:, None]
    packed = _pack(codes)
    x = torch.randn(M, K, generator=g)
    _close(kernels.linear_lut4(x, packed, scales, group, rows, table, mult), x @ w.t())
    torch.testing.assert_close(kernels.dequant_lut4(packed, scales, group, rows, table, mult), w)


def test_lut4_covers_all_sixteen_codes_in_column_order() -> None:
    codes = torch.arange(16).repeat(2, 2)  # [2, 32]: code c at column c and c + 16
    packed = _pack(codes)
    ones_h, ones = torch.ones(2, 2, dtype=torch.float16), torch.ones(2)
    w = kernels.dequant_lut4(packed, ones_h, 16, ones, kernels.E2M1_DOUBLED, 0.5)
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6])
    assert torch.equal(w, e2m1.repeat(2, 2))


@pytest.mark.parametrize("rows,dim", [(1, 640), (5, 256), (300, 640), (3, 100)])
def test_rms_norm(rows: int, dim: int) -> None:
    g = torch.Generator().manual_seed(rows + dim)
    x, w = torch.randn(rows, dim, generator=g) * 3, torch.randn(dim, generator=g)
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), F.rms_norm(x, (dim,), w, 1e-6), rtol=1e-5, atol=1e-5)


def test_bf16_weight_format_uses_kernel_at_every_batch_size() -> None:
    from tokenfab.quant.bf16 import BF16Weight

    g = torch.Generator().manual_seed(3)
    w = BF16Weight(torch.randn(96, 64, generator=g))
    assert w.use_kernel and w.nbytes == 96 * 64 * 2
    for m in (1, 300):
        x = torch.randn(m, 64, generator=g)
        _close(w.matmul(x), x @ w.dequantize().t())


SHORT_SPANS = [(0, 1), (3, 17), (5, 24), (0, 32)]
LONG_SPANS = [(0, 1), (6, 301), (0, 129), (64, 64)]
"""Long spans are split across threads (each part merged by its own max and sum), including parts left empty
by a short span and an empty span."""


@pytest.mark.parametrize("spans,threads", [(SHORT_SPANS, 2), (LONG_SPANS, 2), (LONG_SPANS[1:2], 2),
                                           (LONG_SPANS, 5)])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 1, 256), (8, 2, 64), (2, 2, 20)])
def test_paged_decode_attention_matches_softmax_over_the_span(spans: list[tuple[int, int]], threads: int,
                                                              heads: int, kv_heads: int, dim: int) -> None:
    """Scattered blocks, spans that start mid-block (sliding window) and end mid-block, one-token spans."""
    g = torch.Generator().manual_seed(heads * dim)
    block_size, num_blocks = 4, 100
    k_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g)
    blocks = torch.stack([torch.randperm(num_blocks, generator=g)[:80] for _ in spans])
    lo = torch.tensor([a for a, _ in spans], dtype=torch.int32)
    hi = torch.tensor([b for _, b in spans], dtype=torch.int32)
    q = torch.randn(len(spans), heads, dim, generator=g)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = kernels.paged_decode_attention(q, k_cache, v_cache, blocks, lo, hi, block_size, 0.125)
    finally:
        torch.set_num_threads(before)
    tiled = build.kernel_path().level in cpu_isa.TILE_LEVELS and dim % cpu_isa.TILE_ATTENTION_DIM == 0
    tol = cpu_isa.TILE_TOLERANCE if tiled else 1e-5
    for b, (a, e) in enumerate(spans):
        pos = torch.arange(a, e)
        slots = blocks[b, pos // block_size] * block_size + pos % block_size
        keys = k_cache[slots].repeat_interleave(heads // kv_heads, dim=1)  # [span, heads, dim]
        values = v_cache[slots].repeat_interleave(heads // kv_heads, dim=1)
        if e == a:
            assert torch.equal(out[b], torch.zeros_like(out[b]))
            continue
        weights = torch.softmax(torch.einsum("hd,shd->hs", q[b], keys) * 0.125, dim=-1)
        torch.testing.assert_close(out[b], torch.einsum("hs,shd->hd", weights, values), rtol=tol, atol=tol)


@pytest.mark.parametrize("post", [True, False])
@pytest.mark.parametrize("rows,dim", [(1, 640), (3, 20), (70, 1152)])
def test_add_rms_norm_equals_post_norm_add_then_norm(post: bool, rows: int, dim: int) -> None:
    g = torch.Generator().manual_seed(rows * dim + post)
    x, h = torch.randn(rows, dim, generator=g) * 2, torch.randn(rows, dim, generator=g) * 5
    hw, w = torch.randn(dim, generator=g), torch.randn(dim, generator=g)
    ref_x = x + (kernels.rms_norm(h, hw, 1e-6) if post else h)
    normed = kernels.add_rms_norm_(x, h, hw if post else None, w, 1e-6)
    assert torch.equal(x, ref_x)  # the residual is updated in place, bit for bit as the separate ops
    assert torch.equal(normed, kernels.rms_norm(ref_x, w, 1e-6))
    torch.testing.assert_close(normed, F.rms_norm(ref_x, (dim,), w, 1e-6), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("with_norm", [True, False])
def test_qk_norm_rope_in_place_matches_norm_then_rotary(with_norm: bool) -> None:
    from tokenfab.models.layers import RotaryEmbedding, apply_rotary

    g = torch.Generator().manual_seed(int(with_norm))
    heads, kv_heads, dim, tokens = 4, 2, 32, 5
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * dim + 3, generator=g)[:, :-3]  # rows strided, not packed
    rope = RotaryEmbedding(dim, 64, 10000.0, None)
    cos, sin = rope.table(torch.tensor([0, 7, 8, 30, 63]), torch.float32)
    qw, kw = (torch.randn(dim, generator=g), torch.randn(dim, generator=g)) if with_norm else (None, None)
    q = qkv[:, : heads * dim].reshape(tokens, heads, dim)
    k = qkv[:, heads * dim : (heads + kv_heads) * dim].reshape(tokens, kv_heads, dim)
    v_before = qkv[:, (heads + kv_heads) * dim :].clone()
    if with_norm:
        q, k = F.rms_norm(q, (dim,), qw, 1e-6), F.rms_norm(k, (dim,), kw, 1e-6)
    ref_q, ref_k = apply_rotary(q, k, cos, sin)
    kernels.qk_norm_rope_(qkv, heads, kv_heads, dim, qw, kw, 1e-6, cos.view(-1, dim), sin.view(-1, dim))
    torch.testing.assert_close(qkv[:, : heads * dim].reshape(tokens, heads, dim), ref_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(qkv[:, heads * dim : (heads + kv_heads) * dim].reshape(tokens, kv_heads, dim), ref_k,
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(qkv[:, (heads + kv_heads) * dim :], v_before)


@pytest.mark.parametrize("table,mult,group", [(kernels.E2M1_DOUBLED, 0.5, 16), (kernels.INT4_TWOS_COMPLEMENT, 1.0, 32)])
@pytest.mark.parametrize("M,N,K", [(1, 37, 640), (2, 1027, 64), (3, 64, 256), (5, 70, 2048)])
def test_lut4_w4a8_equals_the_weights_against_int8_rounded_activations(table: torch.Tensor, mult: float, group: int,
                                                                        M: int, N: int, K: int) -> None:
    g = torch.Generator().manual_seed(M + N + K + group)
    codes = torch.randint(0, 16, (N, K), generator=g)
    scales = (torch.rand(N, K // group, generator=g) + 0.1).half()
    rows = torch.rand(N, generator=g) + 0.5
    w = table[codes].float() * mult * scales.float().repeat_interleave(group, dim=1) * rows[:, None]
    x = torch.randn(M, K, generator=g)
    y = kernels.linear_lut4_q8(x, _pack(codes), scales, group, rows, table, mult)
    _close_loose(y, kernels.quantize_rows_q8(x) @ w.t())
    # and it stays near the float result: int8 activations cost ~1% relative error on random data
    assert ((y - x @ w.t()).norm() / (x @ w.t()).norm()).item() < 0.02


@pytest.mark.parametrize("M,N,K", [(1, 37, 640), (2, 1027, 64), (4, 29, 128), (33, 70, 96), (17, 48, 2048)])
def test_int8_w8a8(M: int, N: int, K: int) -> None:
    g = torch.Generator().manual_seed(M * N)
    x = torch.randn(M, K, generator=g)
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, generator=g) / 100
    w = q.float() * scale[:, None]
    _close_loose(kernels.linear_int8_q8(x, q, scale), kernels.quantize_rows_q8(x) @ w.t())


def test_lut4_w4a8_reads_nvfp4_fp8_block_scales_directly() -> None:
    g = torch.Generator().manual_seed(5)
    codes = torch.randint(0, 16, (70, 256), generator=g)
    scales8 = (torch.rand(70, 16, generator=g) * 300 + 2**-9).to(torch.float8_e4m3fn)
    rows = torch.rand(70, generator=g)
    x = torch.randn(3, 256, generator=g)
    args = (_pack(codes), 16, rows, kernels.E2M1_DOUBLED, 0.5)
    via_fp8 = kernels.linear_lut4_q8(x, args[0], scales8, *args[1:])
    via_fp16 = kernels.linear_lut4_q8(x, args[0], scales8.float().half(), *args[1:])  # e4m3 -> fp16 is exact
    torch.testing.assert_close(via_fp8, via_fp16, rtol=1e-6, atol=1e-6)


def test_integer_paths_are_batch_invariant() -> None:
    """A row's result is bitwise the same alone and inside a batch (rows are quantized independently)."""
    g = torch.Generator().manual_seed(11)
    codes = torch.randint(0, 16, (50, 256), generator=g)
    scales, rows = (torch.rand(50, 16, generator=g) + 0.1).half(), torch.ones(50)
    x = torch.randn(9, 256, generator=g)
    args = (_pack(codes), scales, 16, rows, kernels.E2M1_DOUBLED, 0.5)
    batch = kernels.linear_lut4_q8(x, *args)
    for i in range(9):
        assert torch.equal(kernels.linear_lut4_q8(x[i : i + 1], *args)[0], batch[i])


def _close_loose(y: torch.Tensor, ref: torch.Tensor) -> None:
    # Exact integer dot products, float scales applied per 32-column block: only rounding of the scale products
    # (and an activation landing exactly on a rounding tie) separates the kernel from the reference.
    assert ((y - ref).abs().max() / ref.abs().max()).item() < 1e-3


def test_argmax_rows_matches_torch_including_ties_nan_and_tails() -> None:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(6, 1003, generator=g)
    x[0, 40] = 30.0  # in the unrolled part
    x[1, 17] = x[1, 900] = 50.0  # tie: the first index wins
    x[2, 1002] = 99.0  # in the scalar tail
    x[3, 5] = float("nan")
    x[3, 800] = float("nan")  # NaN counts as the largest, first NaN wins
    x[4] = float("-inf")
    x[5, 0] = float("inf")
    assert torch.equal(kernels.argmax_rows(x), x.argmax(dim=-1))


@pytest.mark.parametrize("gelu", [True, False])
@pytest.mark.parametrize("rows,inter", [(1, 2048), (3, 13), (40, 2048)])
def test_gated_activation_matches_torch(gelu: bool, rows: int, inter: int) -> None:
    g = torch.Generator().manual_seed(rows + inter)
    gate_up = torch.randn(rows, 2 * inter, generator=g) * 4
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -1e-6])  # saturated, zero and tiny inputs
    gate, up = gate_up.double().chunk(2, dim=-1)
    # float64 reference: torch's float32 gelu loses digits in 1 + tanh(u) near -1, where the kernel's
    # x * sigmoid(2u) form does not.
    ref = ((F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)) * up).float()
    torch.testing.assert_close(kernels.gated_act(gate_up, gelu), ref, rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("gelu", [True, False])
@pytest.mark.parametrize("M,K,inter,hidden", [(1, 64, 96, 64), (3, 640, 2048, 640), (5, 32, 48, 33),
                                              (17, 128, 64, 130)])
def test_gated_mlp_bf16_is_the_three_calls_bit_for_bit(gelu: bool, M: int, K: int, inter: int, hidden: int) -> None:
    """Register (M < 8) and GEMM paths, outputs not a multiple of the 4-row block; the fused call must equal
    the unfused one exactly, so a request's tokens do not depend on which of the two its batch took."""
    g = torch.Generator().manual_seed(M * K + inter)
    x = torch.randn(M, K, generator=g)
    w_gu = (torch.randn(2 * inter, K, generator=g) / K**0.5).bfloat16()
    w_down = (torch.randn(hidden, inter, generator=g) / inter**0.5).bfloat16()
    fused = kernels.gated_mlp_bf16(x, w_gu, w_down, gelu)
    unfused = kernels.linear_bf16(kernels.gated_act(kernels.linear_bf16(x, w_gu), gelu), w_down)
    assert torch.equal(fused, unfused)
    gate, up = (x @ w_gu.float().t()).chunk(2, dim=-1)
    act = F.gelu(gate, approximate="tanh") if gelu else F.silu(gate)
    _close(fused, (act * up) @ w_down.float().t())


@pytest.mark.parametrize("with_norm", [True, False])
@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 1, 256), (8, 2, 64), (2, 2, 20)])
def test_decode_attention_step_is_norm_rope_cache_write_and_attention(with_norm: bool, heads: int, kv_heads: int,
                                                                     dim: int) -> None:
    """The fused decode call equals its four parts exactly: q/k norm + rotary in place, the new key and value in
    their slots, attention over spans that end at (and include) the new token."""
    from tokenfab.models.layers import RotaryEmbedding

    g = torch.Generator().manual_seed(heads * dim + with_norm)
    block_size, num_blocks, batch = 4, 60, 3
    k_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g)
    v_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g)
    blocks = torch.stack([torch.randperm(num_blocks, generator=g)[:40] for _ in range(batch)])
    lo = torch.tensor([0, 5, 0], dtype=torch.int32)
    hi = torch.tensor([1, 150, 77], dtype=torch.int32)
    pos = (hi - 1).long()
    slots = blocks[torch.arange(batch), pos // block_size] * block_size + pos % block_size
    width = (heads + 2 * kv_heads) * dim
    qkv = torch.randn(batch, width + 5, generator=g)[:, :width]  # rows strided
    cos, sin = RotaryEmbedding(dim, 256, 10000.0, None).table(pos, torch.float32)
    qw, kw = (torch.randn(dim, generator=g), torch.randn(dim, generator=g)) if with_norm else (None, None)

    ref_qkv, ref_k, ref_v = qkv.clone(), k_cache.clone(), v_cache.clone()
    kernels.qk_norm_rope_(ref_qkv, heads, kv_heads, dim, qw, kw, 1e-6, cos.view(-1, dim), sin.view(-1, dim))
    q, k, v = ref_qkv.split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
    ref_k.index_copy_(0, slots, k.reshape(batch, kv_heads, dim))
    ref_v.index_copy_(0, slots, v.reshape(batch, kv_heads, dim))
    ref = kernels.paged_decode_attention(q.reshape(batch, heads, dim), ref_k, ref_v, blocks, lo, hi, block_size, 0.1)

    out = kernels.decode_attention_step(qkv, heads, kv_heads, dim, qw, kw, 1e-6, cos, sin, k_cache, v_cache, slots,
                                        blocks, lo, hi, block_size, 0.1)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    assert torch.equal(out, ref)


def test_gemm_path_rows_do_not_depend_on_the_batch() -> None:
    """Each output of the GEMM path is one FMA chain over k in order: a row's result is the same bit for bit in
    batches of 8 to 48 rows, wherever it sits in them."""
    g = torch.Generator().manual_seed(7)
    w = torch.randn(100, 640, generator=g).bfloat16()
    x = torch.randn(48, 640, generator=g)
    ref = kernels.linear_bf16(x, w)
    for rows in (slice(0, 8), slice(5, 22), slice(17, 48), slice(40, 48)):
        assert torch.equal(kernels.linear_bf16(x[rows].contiguous(), w), ref[rows])
