"""The decode step through every decoder layer in one kernel call (csrc/decode_layers.cpp): typed bindings.

`DecodeLayers` holds the layers' weight and cache pointers, bound once; `run` passes a step's varying parts (KV
group metadata, rotary tables, the residual stream) and makes a single call into the library.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from tokenfab.kernels.build import library
from tokenfab.kernels.gguf import SegmentTable

_P, _I64, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float


class _Dims(ctypes.Structure):
    _fields_ = [
        ("hidden", _I64),
        ("heads", _I64),
        ("kv_heads", _I64),
        ("head_dim", _I64),
        ("inter", _I64),
        ("block_size", _I64),
        ("eps", _F32),
        ("scale", _F32),
        ("gelu", _I64),
    ]


class _Linear(ctypes.Structure):
    _fields_ = [
        ("kind", _I64),
        ("N", _I64),
        ("K", _I64),
        ("w", _P),
        ("scale", _P),
        ("segments", _I64),
        ("layouts", _P),
        ("rows", _P),
        ("data", _P),
    ]


_BF16, _GGUF, _INT8, _BF16_ACT = 1, 2, 3, 4
_NORMS = ("q_norm", "k_norm", "post_attn_norm", "mlp_norm", "post_mlp_norm", "next_norm", "k_cache", "v_cache")


class _Layer(ctypes.Structure):
    _fields_ = [
        ("qkv", _Linear),
        ("qkv_bias", _P),
        ("o", _Linear),
        ("gate_up", _Linear),
        ("down", _Linear),
        *((name, _P) for name in _NORMS),
        ("group", _I64),
        ("sliding", _I64),
    ]


class _Group(ctypes.Structure):
    _fields_ = [("slots", _P), ("blocks", _P), ("max_blocks", _I64), ("lo", _P), ("hi", _P)]


@dataclass(frozen=True, slots=True)
class DecodeDims:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    inter: int
    block_size: int
    eps: float
    scale: float
    gelu_tanh: bool


@dataclass(frozen=True, slots=True)
class KernelLinear:
    """A projection's weight [N, K] as a kernel reads it: bf16 rows, int8 rows with a float32 scale per row (W8A8),
    or GGUF block segments (one of them given; tensors contiguous)."""

    N: int
    K: int
    bf16: torch.Tensor | None = None
    bf16_activations: bool = False
    """With `bf16`: x taken as bf16 (kernels.linear_bf16_act)."""
    int8: tuple[torch.Tensor, torch.Tensor] | None = None
    gguf: SegmentTable | None = None

    def _struct(self) -> _Linear:
        if self.bf16 is not None:
            kind = _BF16_ACT if self.bf16_activations else _BF16
            return _Linear(kind, self.N, self.K, self.bf16.data_ptr(), None, 0, None, None, None)
        if self.int8 is not None:
            q, scale = self.int8
            return _Linear(_INT8, self.N, self.K, q.data_ptr(), scale.data_ptr(), 0, None, None, None)
        t = self.gguf
        assert t is not None, "a kernel linear holds bf16, int8 or gguf weights"
        return _Linear(
            _GGUF,
            self.N,
            self.K,
            None,
            None,
            t.count,
            ctypes.addressof(t.layouts),
            ctypes.addressof(t.rows),
            ctypes.addressof(t.data),
        )


@dataclass(frozen=True, slots=True)
class LayerTensors:
    """One layer's projections, norm weights (float32; None where the model has none) and KV cache tensors
    (float32 [slots, kv_heads, head_dim]); `group` is its KV group, `sliding` its rotary table."""

    qkv: KernelLinear
    qkv_bias: torch.Tensor | None
    o: KernelLinear
    gate_up: KernelLinear
    down: KernelLinear
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    post_attn_norm: torch.Tensor | None
    mlp_norm: torch.Tensor
    post_mlp_norm: torch.Tensor | None
    next_norm: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    group: int
    sliding: bool


@dataclass(frozen=True, slots=True)
class GroupStep:
    """A KV group's metadata for one decode step (see TorchAttentionBackend): each sequence's new-token slot
    (int64 [B]), its block list (int64 [B, max_blocks]) and the span [lo, hi) it attends to (int32 [B])."""

    slots: torch.Tensor
    blocks: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


class DecodeLayers:
    """Every layer of a decoder bound for single-token steps. Holds the tensors it points to."""

    def __init__(self, dims: DecodeDims, layers: list[LayerTensors]) -> None:
        self._fn = library().tf_decode_layers
        self._keep = layers
        self.hidden = dims.hidden
        self._dims = _Dims(
            dims.hidden,
            dims.heads,
            dims.kv_heads,
            dims.head_dim,
            dims.inter,
            dims.block_size,
            dims.eps,
            dims.scale,
            int(dims.gelu_tanh),
        )
        self._layers = (_Layer * len(layers))(
            *(
                _Layer(
                    t.qkv._struct(),
                    _ptr(t.qkv_bias),
                    t.o._struct(),
                    t.gate_up._struct(),
                    t.down._struct(),
                    *(_ptr(getattr(t, name)) for name in _NORMS),
                    t.group,
                    int(t.sliding),
                )
                for t in layers
            )
        )
        self._num_layers = len(layers)

    def run(
        self,
        x: torch.Tensor,
        normed: torch.Tensor,
        groups: list[GroupStep],
        rope: tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """x [M, hidden] float32 (the residual stream, updated in place); normed: the first layer's input norm of x,
        overwritten with the final norm of the stream. rope: (cos, sin) of the full and the sliding tables,
        [M, head_dim] contiguous each."""
        if x.shape != normed.shape or x.shape[-1] != self.hidden or not (x.is_contiguous() and normed.is_contiguous()):
            raise ValueError(f"x and normed must be contiguous [M, {self.hidden}]")
        step = (_Group * len(groups))(
            *(
                _Group(g.slots.data_ptr(), g.blocks.data_ptr(), g.blocks.shape[1], g.lo.data_ptr(), g.hi.data_ptr())
                for g in groups
            )
        )
        (cos_full, sin_full), (cos_sliding, sin_sliding) = rope
        cos = (_P * 2)(cos_full.data_ptr(), cos_sliding.data_ptr())
        sin = (_P * 2)(sin_full.data_ptr(), sin_sliding.data_ptr())
        self._fn(
            ctypes.byref(self._dims),
            self._layers,
            self._num_layers,
            step,
            cos,
            sin,
            x.data_ptr(),
            normed.data_ptr(),
            x.shape[0],
            torch.get_num_threads(),
        )
