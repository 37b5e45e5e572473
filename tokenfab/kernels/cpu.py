"""Typed wrappers over the CPU kernels: tensors in, tensors out, shapes and dtypes checked at the boundary.

Every function takes x [M, K] float32 (contiguous) and returns x W^T as float32 [M, N]; `dequant_*` return W as
float32 [N, K]. The caller checks `available()` first; formats fall back to torch when it is False.
"""

from __future__ import annotations

import torch

from tokenfab.kernels.build import library, load_library

E2M1_DOUBLED = torch.tensor([0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12], dtype=torch.int8)
"""NVFP4's E2M1 code -> 2 x value (exact integers; the 1/2 goes into the row scale)."""
INT4_TWOS_COMPLEMENT = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, -8, -7, -6, -5, -4, -3, -2, -1], dtype=torch.int8)


def available() -> bool:
    return load_library() is not None


def supports(K: int, step: int = 8) -> bool:
    """The kernels walk K in steps of 8 (16 for bf16 and 4-bit codes)."""
    return available() and K % step == 0


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _opt(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def launch(fn, x: torch.Tensor, N: int, K: int, *weight_args: object) -> torch.Tensor:
    """Run a linear kernel `fn(x, *weight_args, y, M, N, K, threads)` on x [..., K] (float32, else converted) and
    return y float32 [..., N]. A decode step makes ~75 of these calls, so it does only what it must in Python."""
    if x.shape[-1] != K:
        raise ValueError(f"x has {x.shape[-1]} features, weight expects {K}")
    flat = x.dim() == 2
    x2 = x if flat else x.reshape(-1, K)
    if x2.dtype != torch.float32 or not x2.is_contiguous():
        x2 = x2.float().contiguous()
    M = x2.shape[0]
    y = torch.empty(M, N, dtype=torch.float32)
    fn(x2.data_ptr(), *weight_args, y.data_ptr(), M, N, K, torch.get_num_threads())
    return y if flat else y.view(*x.shape[:-1], N)


def _linear(kernel: str, x: torch.Tensor, N: int, K: int, *weight_args: object) -> torch.Tensor:
    return launch(getattr(load_library(), kernel), x, N, K, *weight_args)


class BoundLinear:
    """A linear kernel bound to one weight at load time: the function and the weight's pointers are looked up
    once, not on each of a decode step's ~75 calls. Holds the weight tensors, so the pointers stay valid."""

    __slots__ = ("_fn", "_args", "_keep", "N", "K")

    def __init__(self, kernel: str, weights: tuple[torch.Tensor, ...], N: int, K: int, *extra: object) -> None:
        self._fn = getattr(load_library(), kernel)
        self._keep = weights
        self._args = (*(w.data_ptr() for w in weights), *extra)
        self.N, self.K = N, K

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return launch(self._fn, x, self.N, self.K, *self._args)


def bind_linear_bf16(w: torch.Tensor, bf16_activations: bool = False) -> BoundLinear:
    """linear_bf16 (or linear_bf16_act) with `w` bound (see BoundLinear)."""
    return BoundLinear("tf_linear_bf16_act" if bf16_activations else "tf_linear_bf16", (w,), *w.shape)


def linear_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """w bfloat16 [N, K], K % 16 == 0."""
    return _linear("tf_linear_bf16", x, *w.shape, _ptr(w))


def linear_bf16_act(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """linear_bf16 with bf16 activations where the CPU computes them natively (`bf16_activations()`): x rounded to
    bf16 once, each output summed in one order at every batch size; elsewhere exactly linear_bf16."""
    return _linear("tf_linear_bf16_act", x, *w.shape, _ptr(w))


def bf16_activations() -> bool:
    """Whether linear_bf16_act takes x as bf16 here (the avx512_bf16 level), rather than fp32 like linear_bf16."""
    lib = load_library()
    return lib is not None and bool(lib.tf_bf16_activations())


def linear_int8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _linear("tf_linear_i8", x, *w.shape, _ptr(w), _ptr(scale))


def linear_fp8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """w: float8_e4m3fn [N, K] (or its bytes as uint8); scale float32 [N]."""
    return _linear("tf_linear_fp8", x, *w.shape, _ptr(w), _ptr(scale))


def linear_lut4(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    group: int,
    rows: torch.Tensor | None,
    lut: torch.Tensor,
    lut_mult: float,
) -> torch.Tensor:
    """packed uint8 [N, K/2] (even column in the low nibble); scales float16 [N, K/group]; rows float32 [N] or None;
    lut int8 [16] code -> value / lut_mult."""
    return _linear(
        "tf_linear_lut4",
        x,
        packed.shape[0],
        packed.shape[1] * 2,
        _ptr(packed),
        _ptr(scales),
        group,
        _opt(rows),
        _ptr(lut),
        lut_mult,
    )


def linear_lut4_q8(
    x: torch.Tensor,
    packed: torch.Tensor,
    scales: torch.Tensor,
    group: int,
    rows: torch.Tensor | None,
    lut: torch.Tensor,
    lut_mult: float,
) -> torch.Tensor:
    """linear_lut4 with x quantized to int8 per 32 columns (W4A8, exact int32 dot products); K % 32 == 0 and
    group in (16, 32). Scales are float16, or (group 16) float8_e4m3fn as NVFP4 stores them."""
    N, K = packed.shape[0], packed.shape[1] * 2
    fp8 = scales.dtype == torch.float8_e4m3fn
    if K % 32 or group not in (16, 32) or (fp8 and group != 16):
        raise ValueError(f"W4A8 needs K % 32 == 0 and group 16 or 32, fp8 scales with 16 (K={K}, group={group})")
    if scales.dtype not in (torch.float16, torch.float8_e4m3fn):
        raise ValueError(f"scales must be float16 or float8_e4m3fn, not {scales.dtype}")
    mult = lut_mult * 256.0 if fp8 else lut_mult  # the kernel's fp8 -> fp16 widening leaves values 2^-8 small
    return _linear(
        "tf_linear_lut4_q8", x, N, K, _ptr(packed), _ptr(scales), group, int(fp8), _opt(rows), _ptr(lut), mult
    )


def linear_int8_q8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """linear_int8 with x quantized to int8 per 32 columns (W8A8); K % 32 == 0."""
    N, K = w.shape
    if K % 32:
        raise ValueError(f"W8A8 needs K % 32 == 0 (K={K})")
    return _linear("tf_linear_i8_q8", x, N, K, _ptr(w), _ptr(scale))


def quantize_rows_q8(x: torch.Tensor) -> torch.Tensor:
    """Reference for the integer paths' activation rounding: x [M, K] -> x rounded to int8 per 32 columns."""
    blocks = x.reshape(x.shape[0], -1, 32)
    scale = blocks.abs().amax(-1, keepdim=True) / 127
    q = torch.where(scale > 0, torch.round(blocks / torch.where(scale > 0, scale, 1)), 0)
    return (q * scale).reshape_as(x)


def gated_act(gate_up: torch.Tensor, gelu_tanh: bool) -> torch.Tensor:
    """act(gate) * up of a fused projection gate_up [..., 2 * inter] (gate first), float32 contiguous;
    act = gelu with the tanh approximation or silu. Returns [..., inter]."""
    if gate_up.dtype != torch.float32 or not gate_up.is_contiguous() or gate_up.shape[-1] % 2:
        raise ValueError("gate_up must be contiguous float32 with an even last dimension")
    inter = gate_up.shape[-1] // 2
    out = gate_up.new_empty((*gate_up.shape[:-1], inter))
    library().tf_gated_act(
        _ptr(gate_up), _ptr(out), gate_up.numel() // (2 * inter), inter, int(gelu_tanh), torch.get_num_threads()
    )
    return out


def gated_mlp_bf16(
    x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, gelu_tanh: bool, bf16_activations: bool = False
) -> torch.Tensor:
    """down(act(gate(x)) * up(x)) for x float32 [M, K] contiguous, w_gate_up bfloat16 [2 * inter, K] (gate rows
    first), w_down bfloat16 [hidden, inter]; K and inter % 16 == 0. One call, equal bit for bit to linear_bf16 (or
    linear_bf16_act), gated_act and linear_bf16 (linear_bf16_act) in turn. Returns [M, hidden]."""
    (two_inter, K), (hidden, inter) = w_gate_up.shape, w_down.shape
    if x.dim() != 2 or x.shape[1] != K or two_inter != 2 * inter or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError(
            f"gated MLP shapes: x {tuple(x.shape)} {x.dtype}, gate/up {tuple(w_gate_up.shape)}, "
            f"down {tuple(w_down.shape)}"
        )
    y = torch.empty(x.shape[0], hidden, dtype=torch.float32)
    library().tf_gated_mlp_bf16(
        x.data_ptr(),
        w_gate_up.data_ptr(),
        w_down.data_ptr(),
        y.data_ptr(),
        x.shape[0],
        K,
        inter,
        hidden,
        int(gelu_tanh),
        int(bf16_activations),
        torch.get_num_threads(),
    )
    return y


def argmax_rows(x: torch.Tensor) -> torch.Tensor:
    """torch.argmax(x, dim=-1) for x float32 [rows, n] contiguous: first index of the maximum, NaN largest."""
    if x.dim() != 2 or x.dtype != torch.float32 or not x.is_contiguous():
        raise ValueError("argmax_rows needs a contiguous float32 [rows, n] tensor")
    out = torch.empty(x.shape[0], dtype=torch.long)
    library().tf_argmax_rows(_ptr(x), x.shape[0], x.shape[1], _ptr(out))
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x float32 contiguous [..., dim]; weight float32 [dim]."""
    dim = x.shape[-1]
    out = torch.empty_like(x)
    library().tf_rmsnorm(_ptr(x), _ptr(weight), _ptr(out), x.numel() // dim, dim, eps, torch.get_num_threads())
    return out


def add_rms_norm_(
    x: torch.Tensor, h: torch.Tensor, h_weight: torch.Tensor | None, weight: torch.Tensor, eps: float
) -> torch.Tensor:
    """In place on the residual x [T, dim] (float32, contiguous): x += rms_norm(h) * h_weight (or x += h when
    h_weight is None); returns rms_norm(x) * weight, all in one pass per row."""
    if not (x.is_contiguous() and h.is_contiguous()) or x.shape != h.shape:
        raise ValueError("x and h must be contiguous and of one shape")
    dim = x.shape[-1]
    out = torch.empty_like(x)
    library().tf_add_rmsnorm(
        _ptr(x), _ptr(h), _opt(h_weight), _ptr(weight), _ptr(out), x.numel() // dim, dim, eps, torch.get_num_threads()
    )
    return out


def qk_norm_rope_(
    qkv: torch.Tensor,
    heads: int,
    kv_heads: int,
    dim: int,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
) -> None:
    """In place on qkv [T, >= (heads + kv_heads) * dim] float32 (rows contiguous): per-head RMSNorm of query and
    key heads (when weights are given), then rotate-half rotary with cos/sin [T, dim] float32."""
    tokens = qkv.shape[0]
    if qkv.stride(1) != 1 or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError("qkv rows and cos/sin must be contiguous")
    qw = _ptr(q_weight) if q_weight is not None else None
    kw = _ptr(k_weight) if k_weight is not None else None
    library().tf_qk_norm_rope(
        _ptr(qkv),
        tokens,
        qkv.stride(0),
        heads,
        kv_heads,
        dim,
        qw,
        kw,
        eps,
        _ptr(cos),
        _ptr(sin),
        torch.get_num_threads(),
    )


ATTENTION_PART = 128
"""Positions per part of the attention kernels' split (on the amx level parts sit at multiples of this in the
block index): callers start a block index at an absolute position that is a multiple of it, so a token's result is
the same bits however its index was built (decode or prefill chunk)."""


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q [B, H, D] float32; caches [slots, KVH, D] float32; blocks int64 [B, max_blocks]; sequence b attends to
    positions [lo[b], hi[b]) (int32) of its block list. Returns [B, H, D]."""
    return _paged("tf_paged_decode_attention", q, k_cache, v_cache, blocks, lo, hi, block_size, scale)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """q [T, H, D] float32: T query tokens of one sequence whose block ids are `blocks` (int64 [max_blocks]); token
    t attends to positions [lo[t], hi[t]) (int32). Each token's row is the same bits as paged_decode_attention gives
    it alone with the same block list. Returns [T, H, D]."""
    return _paged("tf_paged_prefill_attention", q, k_cache, v_cache, blocks, lo, hi, block_size, scale)


def _paged(
    entry: str,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    blocks: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    rows, heads, dim = q.shape
    q, blocks = q.contiguous(), blocks.contiguous()
    out = torch.empty_like(q)
    getattr(library(), entry)(
        _ptr(q),
        _ptr(k_cache),
        _ptr(v_cache),
        _ptr(blocks),
        blocks.shape[-1],
        _ptr(lo),
        _ptr(hi),
        rows,
        heads,
        k_cache.shape[1],
        dim,
        block_size,
        scale,
        _ptr(out),
        torch.get_num_threads(),
    )
    return out


def decode_attention_step(
    qkv: torch.Tensor,
    heads: int,
    kv_heads: int,
    dim: int,
    q_weight: torch.Tensor | None,
    k_weight: torch.Tensor | None,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
    blocks: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    block_size: int,
    scale: float,
) -> torch.Tensor:
    """Attention of B single-token sequences from their fused projection qkv [B, >= (heads + 2 kv_heads) * dim]
    (float32, rows contiguous; q/k normed and rotated in place as qk_norm_rope_ does): writes each token's key
    and value to cache slot slots[b] (int64), then attends as paged_decode_attention. Returns [B, heads, dim].
    A decode step makes one of these per layer, so only the cheap checks are done here."""
    batch = qkv.shape[0]
    if qkv.stride(1) != 1 or not (cos.is_contiguous() and sin.is_contiguous()):
        raise ValueError("qkv rows and cos/sin must be contiguous")
    out = qkv.new_empty((batch, heads, dim))
    library().tf_decode_attention_step(
        qkv.data_ptr(),
        batch,
        qkv.stride(0),
        heads,
        kv_heads,
        dim,
        _opt(q_weight),
        _opt(k_weight),
        eps,
        cos.data_ptr(),
        sin.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slots.data_ptr(),
        blocks.data_ptr(),
        blocks.shape[1],
        lo.data_ptr(),
        hi.data_ptr(),
        block_size,
        scale,
        out.data_ptr(),
        torch.get_num_threads(),
    )
    return out


def dequant_bf16(w: torch.Tensor) -> torch.Tensor:
    N, K = w.shape
    out = torch.empty(N, K, dtype=torch.float32)
    library().tf_dequant_bf16(_ptr(w), _ptr(out), N, K, torch.get_num_threads())
    return out


def dequant_int8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    N, K = w.shape
    out = torch.empty(N, K, dtype=torch.float32)
    library().tf_dequant_i8(_ptr(w), _ptr(scale), _ptr(out), N, K, torch.get_num_threads())
    return out


def dequant_fp8(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    N, K = w.shape
    out = torch.empty(N, K, dtype=torch.float32)
    library().tf_dequant_fp8(_ptr(w), _ptr(scale), _ptr(out), N, K, torch.get_num_threads())
    return out


def dequant_lut4(
    packed: torch.Tensor, scales: torch.Tensor, group: int, rows: torch.Tensor, lut: torch.Tensor, lut_mult: float
) -> torch.Tensor:
    N, K = packed.shape[0], packed.shape[1] * 2
    out = torch.empty(N, K, dtype=torch.float32)
    library().tf_dequant_lut4(
        _ptr(packed), _ptr(scales), group, _ptr(rows), _ptr(lut), lut_mult, _ptr(out), N, K, torch.get_num_threads()
    )
    return out
