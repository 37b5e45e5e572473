"""ISA levels of the CPU kernels: detection and choice, and the same numbers at every level and every batch size.

Each test that runs a level is parametrized over all of them and skips the ones this CPU lacks (with the flags it
lacks), so one machine tests every level it has."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as T

from conftest import random_prompts
from tokenfab import LLM, SamplingParams
from tokenfab.kernels import build
from tokenfab.kernels import cpu as kernels
from tokenfab.kernels import gguf as gguf_kernels
from tokenfab.platform import cpu_isa

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels need g++ and AVX2/FMA/F16C")

LEVELS = [lv.name for lv in cpu_isa.LEVELS]
ZEN3 = frozenset({"avx", "avx2", "fma", "f16c", "sse4_2"})
ZEN4 = ZEN3 | {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16"}
ALDER_LAKE = ZEN3 | {"avx_vnni"}
SAPPHIRE_RAPIDS = ZEN4 | {"avx_vnni", "amx_tile", "amx_bf16", "amx_int8"}


def _needs(level: str) -> None:
    lv = cpu_isa.level(level)
    if lv not in cpu_isa.supported():
        missing = sorted(set(lv.cpu_flags) - cpu_isa.cpu_flags())
        pytest.skip(f"this CPU lacks {', '.join(missing)} for the {level} level")


def test_the_best_level_the_cpu_has_is_chosen() -> None:
    assert cpu_isa.choose(None, ZEN3).level == cpu_isa.level("avx2")
    assert cpu_isa.choose(None, ALDER_LAKE).level == cpu_isa.level("avx2_vnni")
    assert cpu_isa.choose(None, ZEN4).level == cpu_isa.level("avx512_bf16")
    assert [lv.name for lv in cpu_isa.supported(ZEN4)] == ["avx512_bf16", "avx512_vnni", "avx512", "avx2"]
    assert cpu_isa.choose("avx2", ZEN4).level == cpu_isa.level("avx2")
    assert cpu_isa.choose(None, SAPPHIRE_RAPIDS).level == cpu_isa.level("amx")
    assert cpu_isa.choose("avx512_vnni", SAPPHIRE_RAPIDS).level == cpu_isa.level("avx512_vnni")
    none = cpu_isa.choose(None, frozenset({"avx", "sse4_2"}))
    assert none.level is None and "avx2" in none.reason


def test_a_level_the_cpu_lacks_is_an_error_that_names_the_flags() -> None:
    with pytest.raises(ValueError, match="avx512_vnni"):
        cpu_isa.choose("avx512_vnni", ALDER_LAKE)
    with pytest.raises(ValueError, match="unknown CPU ISA level 'sse'"):
        cpu_isa.choose("sse", ZEN3)


def test_the_environment_caps_the_level(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(cpu_isa.ISA_ENV, "avx2")
    assert cpu_isa.choose().level == cpu_isa.level("avx2")
    assert cpu_isa.choose().reason == f"{cpu_isa.ISA_ENV}=avx2"


@pytest.mark.parametrize("level", LEVELS)
def test_each_level_builds_its_own_library(level: str) -> None:
    _needs(level)
    with build.use_level(level) as lib:
        assert build.kernel_path() == build.KernelPath(level, "use_level")
        assert build.load_library() is lib
        assert lib.tf_amx_tiles() == (level in cpu_isa.TILE_LEVELS)
        assert lib.tf_bf16_activations() == cpu_isa.level(level).bf16_activations
    assert build.kernel_path().reason != "use_level"
    with pytest.raises(ValueError, match="unknown"), build.use_level("avx9"):
        pass


BATCHES = (1, 2, 3, 7, 8, 9, 16, 17, 31, 33, 64, 130)
"""Register path (1-7 rows, single and pairs), GEMM path (8+: groups of 16, a last group of 8, 32-row tiles)."""


def _float_kernels(K: int, N: int) -> dict:
    g = torch.Generator().manual_seed(K + N)
    w_bf16 = torch.randn(N, K, generator=g).bfloat16()
    q = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8)
    scale = torch.rand(N, generator=g) / 100
    w_fp8 = (torch.randn(N, K, generator=g) * 40).to(torch.float8_e4m3fn)
    codes = torch.randint(0, 16, (N, K // 2), generator=g, dtype=torch.uint8)
    scales16 = (torch.rand(N, K // 32, generator=g) + 0.1).half()
    return {
        "bf16": lambda x: kernels.linear_bf16(x, w_bf16),
        "bf16-act": lambda x: kernels.linear_bf16_act(x, w_bf16),
        "int8 weight-only": lambda x: kernels.linear_int8(x, q, scale),
        "fp8": lambda x: kernels.linear_fp8(x, w_fp8, scale),
        "int4 weight-only": lambda x: kernels.linear_lut4(x, codes, scales16, 32, None, kernels.INT4_TWOS_COMPLEMENT,
                                                          1.0),
        "W8A8": lambda x: kernels.linear_int8_q8(x, q, scale),
        "W4A8": lambda x: kernels.linear_lut4_q8(x, codes, scales16, 32, None, kernels.INT4_TWOS_COMPLEMENT, 1.0),
    }


def _gguf_kernels(K: int, N: int) -> dict:
    from test_quant_gguf_packed import packed, random_blocks

    out = {}
    for qtype in (T.Q4_0, T.Q5_0, T.Q8_0, T.Q4_K, T.Q5_K, T.Q6_K):
        w = packed(qtype, random_blocks(qtype, N, K, seed=int(qtype)), K)
        assert w.kernel_table is not None
        out[qtype.name] = lambda x, table=w.kernel_table: gguf_kernels.linear(x, table, K)
    return out


@pytest.mark.parametrize("level", LEVELS)
def test_every_format_gives_each_row_the_same_bits_at_every_batch_size_and_level(level: str) -> None:
    """A row of x gives bit-identical outputs alone and in any batch (register, GEMM and tile paths) at every ISA
    level, and the same bits as at avx2 (one order of accumulation for the float kernels, exact integer dot
    products, VNNI or not) except a level's split formats, which stay within TILE_TOLERANCE of them, and bf16-act
    where the level takes x as bf16, within BF16_TOLERANCE."""
    _needs(level)
    lv = cpu_isa.level(level)
    K, N = 512, 75
    x = torch.randn(max(BATCHES), K, generator=torch.Generator().manual_seed(1))
    formats = {**_float_kernels(K, N), **_gguf_kernels(K, N)}
    with build.use_level("avx2"):
        reference = {name: [f(x[i : i + 1]) for i in range(x.shape[0])] for name, f in formats.items()}
    assert all(torch.equal(a, b) for a, b in zip(reference["bf16-act"], reference["bf16"], strict=True))
    with build.use_level(level):
        for name, f in formats.items():
            alone = reference[name]
            bounds = None  # (least, most) difference from avx2's result, relative to its scale
            if name == "bf16-act" and lv.bf16_activations:  # x rounded to bf16: more than the split's difference
                bounds = (cpu_isa.TILE_TOLERANCE, cpu_isa.BF16_TOLERANCE)
            elif name in lv.split_formats or (name == "bf16-act" and "bf16" in lv.split_formats):
                bounds = (0, cpu_isa.TILE_TOLERANCE)
            if bounds is not None:
                alone = [f(x[i : i + 1]) for i in range(x.shape[0])]
                for own, fp32 in zip(alone, reference[name], strict=True):
                    error = (own - fp32).abs().max() / fp32.abs().max()
                    assert bounds[0] < error < bounds[1], (name, error)
            for m in BATCHES:
                batch = f(x[:m])
                for i in range(m):
                    assert torch.equal(batch[i : i + 1], alone[i]), (name, m, i)


SPLIT = [(lv.name, fmt) for lv in cpu_isa.LEVELS for fmt in lv.split_formats]


@pytest.mark.parametrize(("level", "fmt"), SPLIT)
def test_split_formats_keep_rows_apart_across_passes_and_tails(level: str, fmt: str) -> None:
    """A long K makes the bf16 tile path take x in several passes (two groups of 16 rows each) and the vdpbf16ps
    path in passes of a few rows, and K % 64 == 32 leaves the int8 packing a half step; N leaves rows past the last
    tile (and the last block of weight rows). Every row is still its own bits, in any batch, and close to the lower
    levels' result."""
    _needs(level)
    g = torch.Generator().manual_seed(5)
    K, N = 8160, 53
    x = torch.randn(70, K, generator=g)
    w = torch.randn(N, K, generator=g).bfloat16()
    q, scale = torch.randint(-128, 128, (N, K), generator=g, dtype=torch.int8), torch.rand(N, generator=g) / 100

    def f(rows: torch.Tensor) -> torch.Tensor:
        return kernels.linear_bf16(rows, w) if fmt == "bf16" else kernels.linear_int8_q8(rows, q, scale)

    with build.use_level("avx2"):
        lower = f(x)
    with build.use_level(level):
        alone = torch.cat([f(x[i : i + 1]) for i in range(x.shape[0])])
        for m in (1, 15, 16, 17, 33, 64, 70):
            assert torch.equal(f(x[:m]), alone[:m]), m
        assert torch.equal(f(x[37:70].contiguous()), alone[37:70])
    error = ((alone - lower).abs().max() / lower.abs().max()).item()
    assert 0 < error < cpu_isa.TILE_TOLERANCE


@pytest.mark.parametrize("level", LEVELS)
def test_engine_tokens_are_the_same_at_every_level(level: str, tiny_model) -> None:
    """bf16 weights on the kernels (the default where the CPU has native bf16): greedy and seeded tokens of a
    batch are the same at every level the CPU runs."""
    _needs(level)
    path = tiny_model("gemma3")
    prompts = random_prompts([5, 40, 100, 17], seed=8)
    params = [SamplingParams(max_tokens=12, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=12, temperature=0.9, seed=3, ignore_eos=True)] * 2

    def run() -> list[list[int]]:
        llm = LLM(str(path), dtype="bfloat16", kv_cache_memory_gb=0.02, max_model_len=1024,
                  max_num_batched_tokens=64)
        assert llm.engine.core.dtype == torch.float32  # bf16 storage, fp32 compute on the kernels
        return [o.outputs[0].token_ids for o in llm.generate(prompts, params)]

    expected = run()
    with build.use_level(level):
        assert run() == expected


@pytest.mark.parametrize("level", LEVELS)
def test_paged_attention_is_the_same_bits_at_every_level(level: str) -> None:
    """Head dims with whole 16-column steps, an 8-column tail and a scalar tail; spans split into parts."""
    _needs(level)
    g = torch.Generator().manual_seed(11)
    for heads, kv_heads, dim in ((4, 1, 256), (6, 2, 72), (3, 1, 20)):
        block_size, num_blocks = 4, 120
        k_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g)
        v_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g)
        blocks = torch.stack([torch.randperm(num_blocks, generator=g)[:100] for _ in range(3)])
        lo, hi = torch.tensor([0, 5, 0], dtype=torch.int32), torch.tensor([1, 290, 400], dtype=torch.int32)
        q = torch.randn(3, heads, dim, generator=g)

        def attend() -> torch.Tensor:
            return kernels.paged_decode_attention(q, k_cache, v_cache, blocks, lo, hi, block_size, 0.125)

        with build.use_level("avx2"):
            reference = attend()
        with build.use_level(level):
            out = attend()
        if level in cpu_isa.TILE_LEVELS and dim % cpu_isa.TILE_ATTENTION_DIM == 0:
            error = ((out - reference).abs().max() / reference.abs().max()).item()
            assert 0 < error < cpu_isa.TILE_TOLERANCE, (heads, kv_heads, dim, error)
        else:
            assert torch.equal(out, reference), (heads, kv_heads, dim)


@pytest.mark.parametrize("level", LEVELS)
def test_a_token_attends_the_same_bits_in_a_prefill_chunk_as_decoding_alone(level: str) -> None:
    """A chunk of queries of one sequence, whole or in two chunks, against each query on its own, with the block index
    starting where the decode path starts it (the window start's block, at a multiple of ATTENTION_PART positions);
    head dims on tiles and off them, full attention and sliding windows."""
    _needs(level)
    g = torch.Generator().manual_seed(5)
    block_size, num_blocks, part = 16, 60, kernels.ATTENTION_PART
    for heads, kv_heads, dim, window in ((4, 1, 256, None), (4, 1, 256, 100), (8, 2, 64, None), (6, 2, 72, 50)):
        k_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g)
        v_cache = torch.randn(num_blocks * block_size, kv_heads, dim, generator=g)
        table = torch.randperm(num_blocks, generator=g)[:40]
        pos = torch.arange(300, 500)
        lo = (pos * 0 if window is None else (pos - window + 1).clamp(min=0)).to(torch.int32)
        hi = (pos + 1).to(torch.int32)
        q = torch.randn(len(pos), heads, dim, generator=g)
        with build.use_level(level):
            chunk = kernels.paged_prefill_attention(q, k_cache, v_cache, table, lo, hi, block_size, 0.1)
            halves = torch.cat(
                [kernels.paged_prefill_attention(q[a:b], k_cache, v_cache, table, lo[a:b], hi[a:b], block_size, 0.1)
                 for a, b in ((0, 77), (77, len(pos)))]
            )
            alone = []
            for t in range(len(pos)):
                first = int(lo[t]) // part * part // block_size
                shift = first * block_size
                alone.append(kernels.paged_decode_attention(
                    q[t : t + 1], k_cache, v_cache, table[first:][None], lo[t : t + 1] - shift, hi[t : t + 1] - shift,
                    block_size, 0.1)[0])
        assert torch.equal(chunk, torch.stack(alone)), (heads, kv_heads, dim, window)
        assert torch.equal(halves, chunk)
