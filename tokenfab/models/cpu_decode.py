"""Single-token steps of a decoder on CPU in one kernel call (tokenfab.kernels.decode_layers).

At batch 1 a small model's layer is a dozen short kernels (Gemma 3 270M: ~0.4 ms of matmuls per layer), and
calling each from Python (arguments converted, outputs allocated, module dispatch) cost another ~0.15 ms per
layer: an eighth of the step. Bound once to the model's weights and the KV cache, `CpuDecodeStep` runs the same
kernels in the same order from C, so its result is the model's forward bit for bit. It applies to steps where
every sequence decodes one token (at most the rows the projections' kernels take) and to models whose
projections are all stored bf16, int8 or in GGUF blocks on the CPU kernels, with fp32 activations and cache;
other steps and models use the forward.
"""

from __future__ import annotations

import sys

import torch

from tokenfab.attention.backend import KVCache
from tokenfab.attention.torch_backend import TorchMetadata
from tokenfab.kernels import cpu as kernels
from tokenfab.kernels.decode_layers import DecodeDims, DecodeLayers, GroupStep, KernelLinear, LayerTensors
from tokenfab.models.decoder import MLP, Attention, DecoderLayer, DecoderModel
from tokenfab.models.layers import Linear, RMSNorm
from tokenfab.quant import cpu_linear
from tokenfab.quant.bf16 import BF16Weight
from tokenfab.quant.gguf_packed import GGUFWeight
from tokenfab.quant.int8 import Int8Weight


def _kernel_linear(linear: Linear) -> tuple[KernelLinear, int] | None:
    """The projection as the layer program takes it and the most rows its forward runs on the kernel."""
    stored = linear.stored
    if stored is None:
        return None
    n, k = stored.shape
    if isinstance(stored, BF16Weight) and stored.use_kernel:
        return KernelLinear(n, k, bf16=stored.weight, bf16_activations=stored.bf16_activations), sys.maxsize
    if isinstance(stored, GGUFWeight) and stored.kernel_table is not None:
        return KernelLinear(n, k, gguf=stored.kernel_table), sys.maxsize
    if isinstance(stored, Int8Weight) and cpu_linear.int8_runs_kernel(stored):
        return KernelLinear(n, k, int8=(stored.qweight, stored.scale)), sys.maxsize
    return None


def _layer_tensors(
    layer: DecoderLayer, next_norm: torch.Tensor, cache: KVCache, index: int
) -> tuple[LayerTensors, int] | None:
    attn, mlp = layer.self_attn, layer.mlp
    if not isinstance(mlp, MLP) or not isinstance(attn, Attention):
        return None  # mixture-of-experts and latent-attention layers run in the forward
    found = [_kernel_linear(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    linears = [w for w in found if w is not None]
    if len(linears) < len(found) or any(m.bias is not None for m in (attn.o_proj, mlp.gate_up_proj, mlp.down_proj)):
        return None
    qkv, o, gate_up, down = (w for w, _ in linears)
    g, i = cache.layer_slot[index]

    def norm(module: RMSNorm | None) -> torch.Tensor | None:
        return None if module is None else module.weight

    tensors = LayerTensors(
        qkv,
        attn.qkv_proj.bias,
        o,
        gate_up,
        down,
        norm(attn.q_norm),
        norm(attn.k_norm),
        norm(layer.post_attn_norm),
        layer.mlp_norm.weight,
        norm(layer.post_mlp_norm),
        next_norm,
        cache.k[g][i],
        cache.v[g][i],
        g,
        layer.sliding,
    )
    return tensors, min(rows for _, rows in linears)


class CpuDecodeStep:
    def __init__(self, model: DecoderModel, layers: DecodeLayers, max_rows: int) -> None:
        self.model = model
        self.layers = layers
        self.max_rows = max_rows
        """Larger steps run the forward, whose projections switch to other paths there (set at binding: the
        formats' row limits are read then)."""

    @classmethod
    def bind(cls, model: DecoderModel, cache: KVCache) -> CpuDecodeStep | None:
        """The model's layers bound for decode steps, or None where the model or cache does not qualify."""
        floats = [p for name, p in model.named_parameters() if "norm" in name] + cache.k + cache.v
        if not kernels.available() or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in floats):
            return None
        layers = model.decoder_layers
        norms = [layer.attn_norm.weight for layer in layers[1:]] + [model.norm.weight]
        found = [_layer_tensors(layer, norms[i], cache, i) for i, layer in enumerate(layers)]
        bound = [b for b in found if b is not None]
        if len(bound) < len(found):
            return None
        a = model.arch
        dims = DecodeDims(
            a.hidden_size,
            a.num_heads,
            a.num_kv_heads,
            a.head_dim,
            a.intermediate_size,
            cache.block_size,
            a.rms_norm_eps,
            a.softmax_scale,
            a.activation == "gelu_tanh",
        )
        return cls(model, DecodeLayers(dims, [t for t, _ in bound]), min(rows for _, rows in bound))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: object) -> torch.Tensor | None:
        """model.forward(input_ids, positions) for a step of single-token sequences (attention metadata of the torch
        backend); None for any other step."""
        tokens = input_ids.shape[0]
        if (
            not isinstance(metadata, TorchMetadata)
            or tokens > self.max_rows
            or any(g.num_decodes != tokens for g in metadata.groups)
        ):
            return None
        x, rope = self.model.embed(input_ids, positions)
        normed = self.model.decoder_layers[0].attn_norm(x)
        groups = []
        for g in metadata.groups:
            assert g.decode_index is not None and g.decode_span is not None  # every token of the step decodes
            groups.append(GroupStep(g.slot_mapping, g.decode_index, *g.decode_span))
        self.layers.run(x, normed, groups, rope)
        return normed
