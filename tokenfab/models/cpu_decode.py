"""Single-token steps of a bf16 decoder on CPU in one kernel call (tokenfab.kernels.decode_layers).

At batch 1 a small model's layer is a dozen short kernels (Gemma 3 270M: ~0.4 ms of matmuls per layer), and
calling each from Python (arguments converted, outputs allocated, module dispatch) cost another ~0.15 ms per
layer: an eighth of the step. Bound once to the model's weights and the KV cache, `CpuDecodeStep` runs the same
kernels in the same order from C, so its result is the model's forward bit for bit. It applies to steps where
every sequence decodes one token (at most the rows the bf16 kernels take) and to models whose projections are
all stored bf16 on the CPU kernels with fp32 activations and cache; other steps and models use the forward.
"""

from __future__ import annotations

import torch

from tokenfab.attention.backend import KVCache
from tokenfab.attention.torch_backend import TorchMetadata
from tokenfab.kernels import cpu as kernels
from tokenfab.kernels.decode_layers import DecodeDims, DecodeLayers, GroupStep, LayerTensors
from tokenfab.models.decoder import DecoderLayer, DecoderModel
from tokenfab.models.layers import Linear
from tokenfab.quant.bf16 import KERNEL_MAX_ROWS, BF16Weight


def _bf16(linear: Linear) -> torch.Tensor | None:
    stored = linear.stored
    return stored.weight if isinstance(stored, BF16Weight) and stored.use_kernel else None


def _layer_tensors(layer: DecoderLayer, next_norm: torch.Tensor, cache: KVCache, index: int) -> LayerTensors | None:
    attn, mlp = layer.self_attn, layer.mlp
    weights = [_bf16(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
    if any(w is None for w in weights) or any(m.bias is not None for m in (attn.o_proj, mlp.gate_up_proj,
                                                                              mlp.down_proj)):
        return None
    g, i = cache.layer_slot[index]

    def norm(module: torch.nn.Module | None) -> torch.Tensor | None:
        return None if module is None else module.weight

    return LayerTensors(*weights[:1], attn.qkv_proj.bias, *weights[1:], norm(attn.q_norm), norm(attn.k_norm),
                        norm(layer.post_attn_norm), layer.mlp_norm.weight, norm(layer.post_mlp_norm), next_norm,
                        cache.k[g][i], cache.v[g][i], g, layer.sliding)


class CpuDecodeStep:
    def __init__(self, model: DecoderModel, layers: DecodeLayers) -> None:
        self.model = model
        self.layers = layers

    @classmethod
    def bind(cls, model: DecoderModel, cache: KVCache) -> CpuDecodeStep | None:
        """The model's layers bound for decode steps, or None where the model or cache does not qualify."""
        floats = [p for name, p in model.named_parameters() if "norm" in name] + cache.k + cache.v
        if not kernels.available() or any(t.dtype != torch.float32 or t.device.type != "cpu" for t in floats):
            return None
        norms = [layer.attn_norm.weight for layer in model.layers[1:]] + [model.norm.weight]
        layers = [_layer_tensors(layer, norms[i], cache, i) for i, layer in enumerate(model.layers)]
        if any(t is None for t in layers):
            return None
        a = model.arch
        dims = DecodeDims(a.hidden_size, a.num_heads, a.num_kv_heads, a.head_dim, a.intermediate_size,
                          cache.block_size, a.rms_norm_eps, a.softmax_scale, a.activation == "gelu_tanh")
        return cls(model, DecodeLayers(dims, layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: object) -> torch.Tensor | None:
        """model.forward(input_ids, positions) for a step of single-token sequences (attention metadata of the torch
        backend); None for any other step."""
        tokens = input_ids.shape[0]
        if (not isinstance(metadata, TorchMetadata) or tokens > KERNEL_MAX_ROWS
                or any(g.num_decodes != tokens for g in metadata.groups)):
            return None
        x, rope = self.model.embed(input_ids, positions)
        normed = self.model.layers[0].attn_norm(x)
        groups = [GroupStep(g.slot_mapping, g.decode_index, *g.decode_span) for g in metadata.groups]
        self.layers.run(x, normed, groups, rope)
        return normed
