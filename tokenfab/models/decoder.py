"""One decoder-only transformer for Llama, Mistral, Qwen2, Qwen3, Gemma 3 text, Qwen3-MoE and Mixtral, over a flat
token batch.

forward(input_ids [T], positions [T]) -> hidden [T, hidden]; attention reads the step's metadata and KV cache from
the scoped forward context. Weights arrive with HF names and are fused (QKV, gate/up) and packed at load time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import cast

import torch
from torch import nn

from tokenfab.attention.backend import HeadLayout, current_forward_context
from tokenfab.kernels import cpu as kernels
from tokenfab.models.arch import ArchConfig
from tokenfab.models.layers import (
    Linear,
    PackedEmbedding,
    RMSNorm,
    RotaryEmbedding,
    add_norm,
    apply_rotary,
    gated_activation,
)
from tokenfab.models.mla import MLAttention
from tokenfab.models.moe import SparseMoE
from tokenfab.quant import QUANTIZED_FORMATS, LinearWeight, build_weight
from tokenfab.quant.bf16 import BF16Weight, fused_gated_mlp
from tokenfab.quant.gguf_packed import GGUFWeight
from tokenfab.quant.plan import QuantPlan

Rope = tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    def __init__(self, arch: ArchConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.arch = arch
        self.layout = HeadLayout(
            arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.softmax_scale, arch.rms_norm_eps
        )
        self.qkv_proj = Linear(arch.hidden_size, arch.q_size + 2 * arch.kv_size, bias=arch.qkv_bias)
        self.o_proj = Linear(arch.q_size, arch.hidden_size)
        self.q_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None
        self.k_norm = RMSNorm(arch.head_dim, arch.rms_norm_eps) if arch.qk_norm else None

    def forward(self, rope: Rope, x: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        ctx = current_forward_context()
        norms = (
            (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None and self.k_norm is not None else None
        )
        out = ctx.backend.forward_qkv(self.layer, qkv, self.layout, norms, rope, ctx.metadata, ctx.cache)
        if out is None:
            q, k, v = self._project(qkv, rope, norms)
            out = ctx.backend.forward(self.layer, q, k, v, self.layout.scale, ctx.metadata, ctx.cache)
        return self.o_proj(out.reshape(-1, self.arch.q_size))

    def _project(
        self, qkv: torch.Tensor, rope: Rope, norms: tuple[torch.Tensor, torch.Tensor] | None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q, k (normed with `norms` where given, and rotated) and v of the fused projection."""
        a = self.arch
        if qkv.dtype == torch.float32 and qkv.device.type == "cpu" and kernels.available():
            q_weight, k_weight = norms if norms is not None else (None, None)
            kernels.qk_norm_rope_(
                qkv,
                a.num_heads,
                a.num_kv_heads,
                a.head_dim,
                q_weight,
                k_weight,
                a.rms_norm_eps,
                rope[0].view(-1, a.head_dim),
                rope[1].view(-1, a.head_dim),
            )
            q, k, v = self._split(qkv)
        else:
            q, k, v = self._split(qkv)
            if self.q_norm is not None and self.k_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = apply_rotary(q, k, *rope)
        return q, k, v.contiguous()

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        a = self.arch
        q, k, v = qkv.split([a.q_size, a.kv_size, a.kv_size], dim=-1)
        return (
            q.reshape(-1, a.num_heads, a.head_dim),
            k.reshape(-1, a.num_kv_heads, a.head_dim),
            v.reshape(-1, a.num_kv_heads, a.head_dim),
        )


class MLP(nn.Module):
    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.activation = arch.activation
        self.gate_up_proj = Linear(arch.hidden_size, 2 * arch.intermediate_size)
        self.down_proj = Linear(arch.intermediate_size, arch.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fused = fused_gated_mlp(self.gate_up_proj.stored, self.down_proj.stored, x, self.activation == "gelu_tanh")
        if fused is not None:
            return fused
        return self.down_proj(gated_activation(self.activation, self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, arch: ArchConfig, layer: int, held: Sequence[int] | None = None) -> None:
        super().__init__()
        self.sliding = arch.layer_windows[layer] is not None
        eps = arch.rms_norm_eps
        self.self_attn: Attention | MLAttention = MLAttention(arch, layer) if arch.mla else Attention(arch, layer)
        self.mlp: MLP | SparseMoE = SparseMoE(arch, held) if arch.is_moe_layer(layer) else MLP(arch)
        self.attn_norm = RMSNorm(arch.hidden_size, eps)
        self.mlp_norm = RMSNorm(arch.hidden_size, eps)
        self.post_attn_norm = RMSNorm(arch.hidden_size, eps) if arch.sandwich_norm else None
        self.post_mlp_norm = RMSNorm(arch.hidden_size, eps) if arch.sandwich_norm else None

    def forward(self, rope: Rope, x: torch.Tensor) -> torch.Tensor:
        """The layer on its own (MTP modules): the residual stream after it."""
        x, _ = self.run(rope, x.clone(), self.attn_norm(x), None)
        return x

    def run(
        self, rope: Rope, x: torch.Tensor, normed: torch.Tensor, next_norm: RMSNorm | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x: the residual stream (may be updated in place); normed: attn_norm(x). Returns the stream after the
        layer and next_norm of it: each norm is fused with the residual add before it (see add_norm)."""
        h = self.self_attn(rope, normed)
        x, mlp_in = add_norm(x, h, self.post_attn_norm, self.mlp_norm)
        assert mlp_in is not None  # add_norm applies the norm it is given
        h = self.mlp(mlp_in)
        return add_norm(x, h, self.post_mlp_norm, next_norm)


class DecoderModel(nn.Module):
    embed_tokens: nn.Embedding | PackedEmbedding

    def __init__(
        self, arch: ArchConfig, max_positions: int, experts_held: Callable[[int], Sequence[int]] | None = None
    ) -> None:
        """`experts_held(layer)`: the routed experts this process holds in a MoE layer (expert parallelism;
        None: all of them)."""
        super().__init__()
        self.arch = arch
        self.build_rope(max_positions)
        self.embed_tokens = nn.Embedding(arch.vocab_size, arch.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(
            DecoderLayer(arch, i, experts_held(i) if experts_held is not None else None) for i in range(arch.num_layers)
        )
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps)
        self.lm_head = Linear(arch.hidden_size, arch.vocab_size)
        if arch.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight  # type: ignore[assignment]  # nn.Module typing

    def build_rope(self, max_positions: int) -> None:
        """(Re)compute the rotary tables; they are buffers, so a model built on the meta device needs this again."""
        a = self.arch
        self.rope_full = RotaryEmbedding(a.head_dim, max_positions, a.rope_full.theta, a.rope_full.scaling)
        self.rope_sliding = RotaryEmbedding(a.head_dim, max_positions, a.rope_sliding.theta, a.rope_sliding.scaling)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        x, (full, sliding) = self.embed(input_ids, positions)
        layers = self.decoder_layers
        normed = layers[0].attn_norm(x)
        for i, layer in enumerate(layers):
            last = i + 1 == len(layers)
            x, after = layer.run(
                sliding if layer.sliding else full, x, normed, self.norm if last else layers[i + 1].attn_norm
            )
            assert after is not None  # every layer is followed by a norm (the next layer's, or the final one)
            normed = after
        return normed

    @property
    def decoder_layers(self) -> list[DecoderLayer]:
        return cast(list[DecoderLayer], list(self.layers))

    def embed(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, tuple[Rope, Rope]]:
        """The residual stream's start (a fresh tensor, scaled embeddings) and the step's rotary tables (full,
        sliding; the same pair where the model uses one rope)."""
        x = self.embed_tokens(input_ids).to(self.norm.weight.dtype)
        if self.arch.embed_scale != 1.0:
            x = x * torch.tensor(self.arch.embed_scale, dtype=x.dtype)
        full = self.rope_full.table(positions, x.dtype)
        sliding = self.rope_sliding.table(positions, x.dtype) if self.arch.rope_sliding != self.arch.rope_full else full
        return x, (full, sliding)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def load_weights(
        self,
        weights: Iterable[tuple[str, torch.Tensor]],
        stored: Callable[[], Mapping[str, LinearWeight]] | None = None,
    ) -> None:
        """Load HF-named tensors, fusing q/k/v and gate/up; fails loudly on anything missing or unknown.
        `stored` gives, once `weights` is exhausted, the projections a quantized checkpoint holds in a weight
        format, by HF module name (see tokenfab.quant.checkpoint). MTP modules, stored as the layers after the
        decoder's, are left to speculative decoding."""
        names = {name for name, _ in self.named_parameters()}

        def keep(name: str) -> bool:  # not MTP modules, nor (expert parallelism) the experts other ranks hold
            return (layer_index(name) or 0) < self.arch.num_layers and (".experts." not in name or name in names)

        load_hf_weights(self, self.arch, weights, stored, keep=keep)

    def prepare_weights(self, plan: str | QuantPlan, hessians: Mapping[str, torch.Tensor] | None = None) -> None:
        """Hand every linear's loaded weight to its storage format (see tokenfab.quant); layers a quantized
        checkpoint already stored are left as they are. `hessians` (layer name -> X^T X of its inputs) are
        needed by plans whose method is gptq (see tokenfab.models.calibration)."""
        plan = QuantPlan(plan) if isinstance(plan, str) else plan
        for name, module in self.named_modules():
            if isinstance(module, Linear) and module.stored is None:
                tied = module is self.lm_head and self.arch.tie_word_embeddings
                hessian = hessians.get(name) if hessians is not None and plan.method == "gptq" else None
                stored = self._build_weight(name, module.weight.data, plan.format_for(name), hessian)
                module.use(stored, keep_plain=tied and not isinstance(stored, BF16Weight))
        if self.norm.weight.is_cuda:
            for moe in self.moe_layers:
                moe.stack_experts()  # one grouped GEMM per projection for all the experts (Triton)
        # bf16 storage: the lookup reads a bf16 table too (the LM head's own when tied) and widens its rows.
        if isinstance(self.lm_head.stored, BF16Weight) and self.arch.tie_word_embeddings:
            self.embed_tokens.weight = nn.Parameter(self.lm_head.stored.weight, requires_grad=False)
        elif plan.default in ("bf16", "bf16-act") and isinstance(self.embed_tokens, nn.Embedding):
            self.embed_tokens.weight = nn.Parameter(self.embed_tokens.weight.data.bfloat16(), requires_grad=False)

    def _build_weight(self, name: str, weight: torch.Tensor, fmt: str, hessian: torch.Tensor | None) -> LinearWeight:
        """Fused layers are quantized projection by projection, as a checkpoint stores them (NVFP4's per-tensor
        scale is then each projection's own), and the parts joined row-wise; GPTQ treats rows independently
        given the (shared) input Hessian, so it splits the same way."""
        from tokenfab.quant import gptq

        cls = QUANTIZED_FORMATS.get(fmt)
        if cls is None or not cls.supports(tuple(weight.shape)):
            return build_weight(fmt, weight)
        fused = name.rpartition(".")[2]
        parts = weight.split(_shard_sizes(self.arch, name)) if fused in ("qkv_proj", "gate_up_proj") else [weight]
        if hessian is not None and gptq.supports(cls):
            built = [gptq.gptq_quantize(cls, part, hessian) for part in parts]
        else:
            built = [cls.quantize(part) for part in parts]
        return built[0] if len(built) == 1 else cls.cat_rows(built)

    def weight_bytes_per_token(self) -> int:
        """Weight bytes a single-token forward reads (the embedding row lookup aside): of a mixture-of-experts
        layer, its router and the share of the experts one token is routed to."""
        experts = {id(m) for moe in self.modules() if isinstance(moe, SparseMoE) for m in moe.experts.modules()}
        linears = sum(m.nbytes for m in self.modules() if isinstance(m, Linear) and id(m) not in experts)
        routed = sum(
            moe.active_fraction * sum(m.nbytes for m in moe.experts.modules() if isinstance(m, Linear))
            + moe.gate.weight.numel() * moe.gate.weight.element_size()
            for moe in self.modules()
            if isinstance(moe, SparseMoE)
        )
        norms = sum(p.numel() * p.element_size() for n, p in self.named_parameters() if "norm" in n)
        return linears + int(routed) + norms

    @property
    def moe_layers(self) -> list[SparseMoE]:
        return [layer.mlp for layer in self.decoder_layers if isinstance(layer.mlp, SparseMoE)]

    def add_expert(self, layer: int, expert: int, weights: Iterable[tuple[str, torch.Tensor]], plan: QuantPlan) -> None:
        """Hold one more routed expert in a MoE layer (expert parallelism, rebalanced): its HF-named tensors
        loaded and given the weight formats `plan` names for it."""
        moe = self.decoder_layers[layer].mlp
        assert isinstance(moe, SparseMoE)
        new = moe.new_expert().to(self.norm.weight.dtype)
        prefix = f"layers.{layer}.mlp.experts.{expert}."
        params = dict(new.named_parameters())
        for hf_name, tensor in weights:
            name, shard = _target_name(self.arch, hf_name)
            target = params[name.removeprefix(prefix)].data
            if shard is not None:
                sizes = _shard_sizes(self.arch, name)
                target = target.narrow(0, sum(sizes[:shard]), sizes[shard])
            target.copy_(tensor)
        for sub, linear in new.named_modules():
            if isinstance(linear, Linear):
                name = prefix + sub
                linear.use(self._build_weight(name, linear.weight.data, plan.format_for(name), None))
        moe.experts[str(expert)] = new

    def expert_tokens(self) -> torch.Tensor | None:
        """Tokens each expert of each MoE layer received since start, [MoE layers, experts] (None for a dense
        model)."""
        moes = self.moe_layers
        return torch.stack([m.tokens for m in moes]) if moes else None


_NORMS = {
    "input_layernorm": "attn_norm",
    "pre_feedforward_layernorm": "mlp_norm",
    "post_feedforward_layernorm": "post_mlp_norm",
}
_EXPERT = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
"""Mixtral's names of an expert's projections."""
_FUSED = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


def _target_name(arch: ArchConfig, name: str) -> tuple[str, int | None]:
    """Map an HF parameter name to (our parameter name, shard index in a fused weight or None)."""
    name = name.removeprefix("model.language_model.").removeprefix("language_model.model.").removeprefix("model.")
    parts = name.split(".")
    if parts[0] == "layers":
        if parts[2] == "block_sparse_moe":  # Mixtral
            parts[2] = "mlp"
        if parts[2] == "mlp" and parts[3] == "experts" and len(parts) == 7:
            return _expert_target(parts)
        if parts[2] == "mlp" and parts[3] == "shared_experts" and parts[4] in _FUSED:  # DeepSeek-V3
            fused, shard = _FUSED[parts[4]]
            return ".".join(parts[:4] + [fused, parts[5]]), shard
        if parts[2] == "self_attn" and arch.mla is not None:
            return ".".join(parts), None  # latent attention's projections are not fused
        if parts[2] in ("self_attn", "mlp") and parts[3] in _FUSED:
            fused, shard = _FUSED[parts[3]]
            return ".".join(parts[:3] + [fused, parts[4]]), shard
        if parts[2] == "post_attention_layernorm":
            parts[2] = "post_attn_norm" if arch.sandwich_norm else "mlp_norm"
        else:
            parts[2] = _NORMS.get(parts[2], parts[2])
        return ".".join(parts), None
    return name.removeprefix("language_model."), None


def _expert_target(parts: list[str]) -> tuple[str, int | None]:
    """layers.<i>.mlp.experts.<e>.<proj>.weight, proj in Qwen3-MoE's names or Mixtral's (w1, w3, w2)."""
    proj = _EXPERT.get(parts[5], parts[5])
    fused, shard = _FUSED.get(proj, (proj, None))
    return ".".join(parts[:5] + [fused, parts[6]]), shard


def layer_index(name: str) -> int | None:
    """The layer number of a mapped parameter name (layers.<i>.…), else None."""
    parts = name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "layers" and parts[1].isdigit() else None


def _shard_sizes(a: ArchConfig, name: str) -> list[int]:
    """Row sizes of the projections fused in the layer `name` (qkv_proj or a gate_up_proj, an expert's too)."""
    if "qkv_proj" in name:
        return [a.q_size, a.kv_size, a.kv_size]
    if ".shared_experts." in name:
        return [a.moe.num_shared_experts * a.moe_intermediate_size] * 2
    return [a.moe_intermediate_size if ".experts." in name else a.intermediate_size] * 2


def linear_layer_name(hf_name: str) -> str | None:
    """The engine's Linear module an HF weight name belongs to (`model.layers.0.self_attn.k_proj.weight` ->
    `layers.0.self_attn.qkv_proj`), or None for anything that is not a linear layer's weight."""
    name = hf_name.removeprefix("model.language_model.").removeprefix("language_model.model.").removeprefix("model.")
    parts = name.removeprefix("language_model.").split(".")
    if parts == ["lm_head", "weight"]:
        return "lm_head"
    if len(parts) == 7 and parts[0] == "layers" and parts[3] == "experts" and parts[6] == "weight":
        mapped, _ = _expert_target(["layers", parts[1], "mlp", *parts[3:]])
        return mapped.removesuffix(".weight")
    if len(parts) != 5 or parts[0] != "layers" or parts[4] != "weight" or not parts[3].endswith("_proj"):
        return None
    return ".".join(parts[:3] + [_FUSED.get(parts[3], (parts[3],))[0]])


def load_hf_weights(
    model: nn.Module,
    arch: ArchConfig,
    weights: Iterable[tuple[str, torch.Tensor]],
    stored: Callable[[], Mapping[str, LinearWeight]] | None = None,
    keep: Callable[[str], bool] = lambda name: True,
) -> None:
    """Copy HF-named tensors into `model` (a DecoderModel, or MTP modules beside one) built for `arch`; mapped
    names that `keep` refuses are skipped."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: set[str] = set()
    for hf_name, tensor in weights:
        if "rotary_emb" in hf_name:
            continue
        name, shard = _target_name(arch, hf_name)
        if not keep(name):
            continue
        if name == "lm_head.weight" and arch.tie_word_embeddings:
            continue
        if name not in params:
            raise ValueError(f"unexpected weight {hf_name!r} (mapped to {name!r})")
        target = params[name].data
        if shard is not None:
            sizes = _shard_sizes(arch, name)
            offset = sum(sizes[:shard])
            target = target.narrow(0, offset, sizes[shard])
        if target.shape != tensor.shape:
            raise ValueError(
                f"shape mismatch for {hf_name}: checkpoint {tuple(tensor.shape)} vs model {tuple(target.shape)}"
            )
        if arch.norm_plus_one and name.endswith("norm.weight"):
            tensor = tensor.float() + 1.0
        target.copy_(tensor)
        loaded.add(f"{name}#{shard}" if shard is not None else name)
    if stored is not None:
        loaded |= _install_stored(model, arch, stored())
    _check_complete(arch, params, loaded)


def _install_stored(model: nn.Module, arch: ArchConfig, stored: Mapping[str, LinearWeight]) -> set[str]:
    """Give each Linear its checkpoint-stored weight, fusing shards row-wise (exact for every format);
    returns the parameter names (with shard markers) now accounted for."""
    fused: dict[str, dict[int | None, LinearWeight]] = {}
    loaded: set[str] = set()
    for module, weight in stored.items():
        name, shard = _target_name(arch, module + ".weight")
        if name == "embed_tokens.weight":
            loaded |= _install_embedding(model, weight)
        else:
            fused.setdefault(name, {})[shard] = weight
    for name, shards in fused.items():
        linear = model.get_submodule(name.removesuffix(".weight")) if name.endswith(".weight") else None
        if not isinstance(linear, Linear):
            raise ValueError(f"quantized tensors for {name!r}, which is not a linear layer")
        if None in shards:
            weight, keys = shards[None], {name}
        else:
            count = len(_shard_sizes(arch, name))
            parts = [shards[i] for i in range(count) if i in shards]
            kinds = {type(p) for p in parts}
            cat_rows = getattr(kinds.pop(), "cat_rows", None) if len(kinds) == 1 else None
            if len(parts) != count or cat_rows is None:
                raise ValueError(f"{name}: fused projections must all be quantized in one format")
            weight, keys = cat_rows(parts), {f"{name}#{i}" for i in range(count)}
        tied = linear is getattr(model, "lm_head", None) and arch.tie_word_embeddings
        linear.use(weight, keep_plain=tied)
        loaded |= keys
    return loaded


def _install_embedding(model: nn.Module, table: LinearWeight) -> set[str]:
    """A packed embedding table (a GGUF file's), which a tied LM head computes with too."""
    if not isinstance(model, DecoderModel):
        raise ValueError("only a decoder model has an embedding table")
    if not isinstance(table, GGUFWeight):
        raise ValueError(f"the embedding table can be stored packed in the gguf format only, not {table.name}")
    plain = model.embed_tokens
    assert isinstance(plain, nn.Embedding), "the embedding table is installed once"
    if table.shape != tuple(plain.weight.shape):
        raise ValueError(f"embedding table {table.shape} != {tuple(plain.weight.shape)}")
    model.embed_tokens = PackedEmbedding(table)
    if model.arch.tie_word_embeddings:
        model.lm_head.use(table)
    return {"embed_tokens.weight"}


def _check_complete(arch: ArchConfig, params: dict[str, nn.Parameter], loaded: set[str]) -> None:
    expected: set[str] = set()
    for name in params:
        if name == "lm_head.weight" and arch.tie_word_embeddings:
            continue
        fused = name.split(".")[-2] if name.endswith(".weight") or name.endswith(".bias") else ""
        if fused in ("qkv_proj", "gate_up_proj"):
            n = 3 if fused == "qkv_proj" else 2
            expected.update(f"{name}#{i}" for i in range(n))
        else:
            expected.add(name)
    missing = sorted(expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {missing[:5]}")
