"""Weight formats: NVFP4 bit-exact against a reference written from the format's definition, and every format's
matmul, dequantization error and row fusion."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tokenfab.kernels import cpu as kernels
from tokenfab.quant import QUANTIZED_FORMATS, FP8Weight, Int4Weight, Int8Weight, NVFP4Weight, build_weight
from tokenfab.quant.dense import DenseWeight, OneDNNPackedWeight
from tokenfab.quant.nibbles import pack_nibbles, unpack_nibbles
from tokenfab.quant.nvfp4 import block_scales, e2m1_codes, tensor_scale

# -- reference NVFP4, from the definitions (E2M1: 1 sign, 2 exponent bits with bias 1, 1 mantissa bit;
#    E4M3 "fn": 1 sign, 4 exponent bits with bias 7, 3 mantissa bits, max 448, no infinities) ----------------------


def ref_e2m1_value(code: int) -> float:
    sign = -1.0 if code & 8 else 1.0
    exponent, mantissa = (code >> 1) & 3, code & 1
    magnitude = mantissa * 0.5 if exponent == 0 else (1 + mantissa / 2) * 2.0 ** (exponent - 1)
    return sign * magnitude


def ref_e2m1_encode(x: float) -> int:
    """Nearest magnitude (ties to the even mantissa), saturating at 6; negative inputs keep the sign bit."""
    a = abs(x)
    best = min(range(8), key=lambda c: (abs(ref_e2m1_value(c) - a), c & 1))
    return best | (8 if x < 0 else 0)


def ref_e4m3_positive_values() -> list[float]:
    values = []
    for exponent in range(16):
        for mantissa in range(8):
            if exponent == 15 and mantissa == 7:
                continue  # NaN
            values.append(mantissa / 8 * 2.0**-6 if exponent == 0 else (1 + mantissa / 8) * 2.0 ** (exponent - 7))
    return values


def ref_e4m3_round(x: float) -> float:
    """Round a positive float to E4M3 with ties to even (even mantissa = even position in the value list)."""
    grid = ref_e4m3_positive_values()
    return grid[min(range(len(grid)), key=lambda i: (abs(grid[i] - x), i & 1))]


def ref_nvfp4(w: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(codes [N, K], block scales [N, K/16] as floats, scale_2) per ModelOpt's recipe, in float32 steps."""
    w = w.astype(np.float32)
    scale_2 = np.float32(np.abs(w).max()) / np.float32(2688.0)
    n, k = w.shape
    codes = np.zeros((n, k), dtype=np.uint8)
    scales = np.zeros((n, k // 16), dtype=np.float32)
    for r in range(n):
        for b in range(k // 16):
            block = w[r, b * 16:(b + 1) * 16]
            s = np.float32(np.abs(block).max()) / (np.float32(6.0) * scale_2)
            s = np.float32(1.0) if s == 0 else max(s, np.float32(2.0**-9))
            scales[r, b] = ref_e4m3_round(float(s))
            divisor = np.float32(scales[r, b]) * scale_2
            for j, v in enumerate(block):
                codes[r, b * 16 + j] = ref_e2m1_encode(float(np.float32(v) / divisor))
    return codes, scales, float(scale_2)


def ref_pack(codes: np.ndarray) -> np.ndarray:
    n, k = codes.shape
    out = np.zeros((n, k // 2), dtype=np.uint8)
    for r in range(n):
        for j in range(k // 2):
            out[r, j] = int(codes[r, 2 * j]) | (int(codes[r, 2 * j + 1]) << 4)
    return out


# -- NVFP4 bit-exactness ---------------------------------------------------------------------------------------------


def test_all_16_e2m1_codes_decode_and_reencode():
    from tokenfab.quant.nvfp4 import E2M1_VALUES

    assert [ref_e2m1_value(c) for c in range(16)] == E2M1_VALUES.tolist()
    assert sorted({abs(ref_e2m1_value(c)) for c in range(16)}) == [0, 0.5, 1, 1.5, 2, 3, 4, 6]
    values = torch.tensor([ref_e2m1_value(c) for c in range(16)])
    values[8] = -0.0
    codes = e2m1_codes(values)
    assert codes.tolist()[:8] == list(range(8)) and codes.tolist()[9:] == list(range(9, 16))
    assert codes[8] == 0  # -0.0 is not negative: code 0, as ModelOpt's (x < 0) sign test gives


def test_e2m1_rounding_ties_saturation_and_tiny_negatives():
    xs = [0.0, 0.1, 0.25, 0.2501, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 5.01, 6.0, 6.3, 7.0, 1e9, 0.74999,
          -0.1, -0.25, -0.75, -2.5, -3.5, -5.0, -6.3, -1e9]
    expected = [ref_e2m1_encode(x) for x in xs]
    assert e2m1_codes(torch.tensor(xs)).tolist() == expected
    # ties go to the even mantissa: 0.25->0, 0.75->1, 1.25->1, 1.75->2, 2.5->2, 3.5->4, 5->4
    assert [ref_e2m1_value(c) for c in expected[2:11]] == [0.0, 0.5, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0]
    assert expected[16] == 8  # a tiny negative rounds to -0 (code 8)


def test_block_scale_rounds_to_nearest_even_e4m3_with_floor_and_zero_blocks():
    grid = ref_e4m3_positive_values()
    ties = [(a + b) / 2 for a, b in zip(grid[:-1], grid[1:])]
    targets = grid[1:] + ties + [1e-6, 2.0**-9 * 0.4, 447.0, 448.0, 3.3, 0.07, 100.5]
    scale_2 = torch.tensor(1.0 / 6.0)  # block_amax / (6 * scale_2) == block_amax: the scale is the target itself
    w = torch.zeros(len(targets) + 1, 16)
    w[:-1, 3] = torch.tensor(targets, dtype=torch.float32)  # last row: an all-zero block
    got = block_scales(w, scale_2).float()[:, 0].tolist()
    want = [ref_e4m3_round(max(float(np.float32(t)), 2.0**-9)) for t in targets] + [1.0]
    assert got == want


def test_per_tensor_scale_is_amax_over_6_times_448():
    w = torch.randn(32, 64) * 3
    w[5, 7] = -17.25
    assert tensor_scale(w).item() == np.float32(17.25) / np.float32(2688.0)


def test_quantize_matches_the_reference_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 64, generator=g) * torch.logspace(-3, 1, 12).unsqueeze(1)  # rows over 4 decades
    w[0, :16] = 0.0  # a zero block
    w[1, 16:32] = torch.tensor([ref_e2m1_value(c) for c in range(16)])  # every code, scaled by a power of two
    w[2, 5] = -1e-7  # a tiny negative in a normal block
    q = NVFP4Weight.quantize(w)
    codes, scales, scale_2 = ref_nvfp4(w.numpy())
    assert np.array_equal(q.codes().numpy(), codes)
    assert np.array_equal(q.packed.numpy(), ref_pack(codes))
    assert np.array_equal(q.block_scale.float().numpy(), scales)
    assert q.global_scale.tolist() == [np.float32(scale_2)] * 12
    assert q.block_scale[0, 0].float() == 1.0 and (q.codes()[0, :16] == 0).all()
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (12, 32)
    assert q.block_scale.dtype == torch.float8_e4m3fn and q.block_scale.shape == (12, 4)


def test_quantize_from_bf16_equals_quantize_from_its_fp32_values():
    w = (torch.randn(8, 32) * 0.1).bfloat16()
    a, b = NVFP4Weight.quantize(w), NVFP4Weight.quantize(w.float())
    assert torch.equal(a.packed, b.packed) and torch.equal(a.block_scale.view(torch.uint8), b.block_scale.view(torch.uint8))


def test_dequantize_is_code_value_times_block_scale_times_global_scale():
    w = torch.randn(6, 48)
    q = NVFP4Weight.quantize(w)
    codes, _, _ = ref_nvfp4(w.numpy())
    values = np.vectorize(ref_e2m1_value)(codes).astype(np.float32)
    scale = q.block_scale.float().numpy() * np.float32(q.global_scale[0].item())
    expected = (values.reshape(6, 3, 16) * scale[:, :, None]).reshape(6, 48)
    assert np.array_equal(q.dequantize().numpy(), expected)


def test_all_zero_tensor_decodes_to_zeros():
    q = NVFP4Weight.quantize(torch.zeros(4, 32))
    assert torch.equal(q.dequantize(), torch.zeros(4, 32))
    assert (q.block_scale.float() == 1.0).all()


def test_nibble_layout_even_column_low():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_nibbles(codes).tolist() == [[0x21, 0x0F]]
    assert torch.equal(unpack_nibbles(pack_nibbles(codes)), codes)
    int4 = Int4Weight(torch.tensor([[0xE1] * 16], dtype=torch.uint8), torch.ones(1, 1, dtype=torch.float16))
    assert int4.dequantize()[0, :2].tolist() == [1.0, -2.0]  # q = 1, -2 as two's-complement nibbles


# -- every format ---------------------------------------------------------------------------------------------------

FORMATS = list(QUANTIZED_FORMATS.values())
# Relative Frobenius error of a Gaussian weight, a few percent above what each format measured here
# (int8 0.0076, fp8 0.026, int4 g32 0.088, nvfp4 0.095).
EXPECTED_REL_ERROR = {"int8": 0.009, "fp8": 0.03, "int4": 0.095, "nvfp4": 0.10}


@pytest.mark.parametrize("cls", FORMATS, ids=lambda c: c.name)
def test_dequantize_error_within_the_format_bound(cls):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(256, 512, generator=g) * 0.05
    q = cls.quantize(w)
    d = q.dequantize()
    err = (d - w).abs()
    assert ((d - w).norm() / w.norm()).item() < EXPECTED_REL_ERROR[cls.name]
    if isinstance(q, Int8Weight):
        assert (err <= q.scale[:, None] / 2 * (1 + 1e-5)).all()
    elif isinstance(q, FP8Weight):
        # 3 mantissa bits: half an ulp is at most 2^-4 of the value (plus subnormal spacing near zero)
        assert (err <= w.abs() / 16 + q.scale[:, None] * 2.0**-10).all()
    elif isinstance(q, Int4Weight):
        step = q.scales.float().repeat_interleave(q.group_size, dim=1)
        # half a step, or a clipped +max (scale >= amax / 8, less fp16 rounding of the scale: 8 ulp of 2^-11)
        assert (err <= step * (1 + 8 * 2.0**-10)).all()
    else:
        step = (q.block_scale.float() * q.global_scale[:, None]).repeat_interleave(16, dim=1)
        assert (err <= step * (1 + 1e-6)).all()  # half the widest gap (4 -> 6) or the 6.375 -> 6 saturation


INT8_ACTIVATIONS = {"nvfp4", "int4", "int8"}
"""Formats whose CPU kernels quantize activations to int8 (tokenfab.quant.cpu_linear)."""


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("cls", FORMATS, ids=lambda c: c.name)
def test_matmul_equals_linear_over_the_dequantized_weight(cls, dtype, tol, monkeypatch):
    """Tolerance relative to max |y|: fp32 1e-5 (summation order, scale applied after the dot for int8/fp8);
    bf16 2e-2 (bf16 rounding of the weight and the output). On CPU with the kernels, nvfp4/int4/int8 run with
    activations rounded to int8 per 32 columns (W4A8/W8A8): checked against the same rounding of x at 1e-3
    (float scale products), and the dequantize-then-linear reference they fall back to at the float tolerance."""
    import tokenfab.quant.base as base
    import tokenfab.quant.int8 as int8

    monkeypatch.setattr(base, "DEQUANT_CHUNK_ELEMENTS", 96 * 64)  # force several row chunks
    monkeypatch.setattr(int8, "_CHUNK_ELEMENTS", 96 * 64)
    g = torch.Generator().manual_seed(2)
    w = torch.randn(300, 64, generator=g) * 0.1
    q = cls.quantize(w)
    for rows in (1, 7):
        x = torch.randn(rows, 64, generator=g).to(dtype)
        y = q.matmul(x)
        ref = F.linear(x.double(), q.dequantize().double())
        assert y.dtype == dtype and y.shape == (rows, 300)
        if cls.name in INT8_ACTIVATIONS and kernels.available():
            fallback = base.dequantized_linear(x, q) if cls.name != "int8" else int8.scaled_rows_linear(x, q.qweight, q.scale)
            assert (fallback.double() - ref).abs().max() <= tol * ref.abs().max()
            ref = F.linear(kernels.quantize_rows_q8(x.float()).double(), q.dequantize().double())
            tol = max(tol, 1e-3)
        assert (y.double() - ref).abs().max() <= tol * ref.abs().max()


@pytest.mark.parametrize("cls", FORMATS, ids=lambda c: c.name)
def test_cat_rows_fuses_exactly(cls):
    parts = [cls.quantize(torch.randn(n, 64) * s) for n, s in ((32, 0.1), (16, 3.0), (16, 0.01))]
    fused = cls.cat_rows(parts)
    assert fused.shape == (64, 64)
    assert torch.equal(fused.dequantize(), torch.cat([p.dequantize() for p in parts]))
    assert fused.nbytes == sum(p.nbytes for p in parts)


@pytest.mark.parametrize("cls", FORMATS, ids=lambda c: c.name)
def test_stored_tensors_have_the_specified_layouts(cls):
    q = cls.quantize(torch.randn(48, 64))
    layouts = {
        "nvfp4": {"packed": (torch.uint8, (48, 32)), "block_scale": (torch.float8_e4m3fn, (48, 4)),
                  "global_scale": (torch.float32, (48,))},
        "int4": {"packed": (torch.uint8, (48, 32)), "scales": (torch.float16, (48, 2))},
        "int8": {"qweight": (torch.int8, (48, 64)), "scale": (torch.float32, (48,))},
        "fp8": {"qweight": (torch.float8_e4m3fn, (48, 64)), "scale": (torch.float32, (48,))},
    }[cls.name]
    for attr, (dtype, shape) in layouts.items():
        t = getattr(q, attr)
        assert (t.dtype, tuple(t.shape)) == (dtype, shape), attr
    assert q.nbytes == sum(getattr(q, a).numel() * getattr(q, a).element_size() for a in layouts)


def test_int4_uses_the_full_signed_range_and_keeps_zero_groups_zero():
    w = torch.zeros(2, 64)
    w[0, :32] = torch.linspace(-1, 1, 32)
    q = Int4Weight.quantize(w)
    codes = unpack_nibbles(q.packed)[0, :32]
    assert {int(c) for c in codes} >= {8, 7}  # both -8 and +7 are used
    assert torch.equal(q.dequantize()[:, 32:], torch.zeros(2, 32)) and q.dequantize()[1].abs().sum() == 0


def test_shapes_a_format_cannot_block_stay_dense():
    w = torch.randn(8, 40)  # 40 is not a multiple of 16 (nvfp4) or 32 (int4)
    assert isinstance(build_weight("nvfp4", w), (DenseWeight, OneDNNPackedWeight))
    assert isinstance(build_weight("int4", w), (DenseWeight, OneDNNPackedWeight))
    assert isinstance(build_weight("int8", w), Int8Weight)
    with pytest.raises(ValueError, match="unknown weight format 'int3'"):
        build_weight("int3", w)


@pytest.mark.parametrize("cls", [Int4Weight, NVFP4Weight], ids=lambda c: c.name)
def test_gptq_lowers_the_output_error_on_its_calibration_inputs_and_keeps_the_format(cls):
    from tokenfab.quant.gptq import gptq_quantize

    g = torch.Generator().manual_seed(5)
    k = 128
    mixing = torch.randn(k, k, generator=g) * 0.2 + torch.eye(k)
    x = (torch.randn(1024, k, generator=g) * torch.logspace(-1, 0.5, k)) @ mixing  # correlated, uneven inputs
    w = torch.randn(64, k, generator=g) * 0.05
    hessian = 2 * x.t() @ x / x.shape[0]
    rtn, gptq = cls.quantize(w), gptq_quantize(cls, w, hessian)

    def output_error(q):
        return ((x @ (q.dequantize() - w).t()).norm() / (x @ w.t()).norm()).item()

    assert output_error(gptq) < 0.8 * output_error(rtn)  # measured 0.049 vs 0.086 (int4), 0.053 vs 0.096
    assert type(gptq) is cls and gptq.shape == w.shape and gptq.nbytes == rtn.nbytes
    if cls is NVFP4Weight:
        assert torch.equal(gptq.global_scale, rtn.global_scale)  # scale_2 from the original amax, as ModelOpt
