"""ArchConfig: the one description of a decoder-only model the engine needs, derived from an HF config dict.

Llama, Mistral, Qwen2, Qwen3 and Gemma 3 differ only in a handful of switches (norm style, QK-norm, sandwich
norms, activation, biases, per-layer sliding windows and rope bases), so one model class serves them all; Qwen3-MoE
and Mixtral are those with a mixture-of-experts feed-forward in some or all layers (tokenfab.models.moe), and
DeepSeek-V3 adds multi-head latent attention (tokenfab.models.mla) and sigmoid, group-limited routing with shared
experts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = (
    "llama",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma3_text",
    "gemma3",
    "qwen3_moe",
    "mixtral",
    "deepseek_v3",
)


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary embedding of one layer type."""

    theta: float
    """Base frequency."""
    scaling: dict[str, Any] | None = None
    """HF rope_scaling dict (types: linear, llama3) or None."""


@dataclass(frozen=True, slots=True)
class MLAConfig:
    """Multi-head latent attention (DeepSeek-V2/V3): keys and values are expanded from one compressed latent per
    token (`kv_lora_rank`) plus one shared rotary key (`qk_rope_head_dim`); the cache stores only those."""

    kv_lora_rank: int
    q_lora_rank: int | None
    """Queries through a low-rank bottleneck of this size (None: one projection)."""
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope_interleave: bool = True
    """Rotary dims in interleaved pairs (x0, x1), (x2, x3), … rather than two halves."""

    @property
    def latent_dim(self) -> int:
        """What the cache holds per token and layer: the latent and the rotary key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


@dataclass(frozen=True, slots=True)
class MoEConfig:
    """Routing beyond Qwen3-MoE's and Mixtral's softmax top-k (DeepSeek-V3)."""

    scoring: str = "softmax"
    """'softmax' or 'sigmoid' (DeepSeek-V3: sigmoid scores, chosen with a learned bias, weighted without it)."""
    num_groups: int = 1
    """Experts in this many groups; a token's experts come from its `topk_groups` best groups only."""
    topk_groups: int = 1
    routed_scaling_factor: float = 1.0
    num_shared_experts: int = 0
    """Experts every token goes through, fused into one MLP of num_shared_experts × moe_intermediate_size."""


@dataclass(frozen=True, slots=True)
class ArchConfig:
    """Shapes and switches of a decoder-only transformer."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    layer_windows: tuple[int | None, ...]
    """Sliding window per layer (None: full attention)."""
    rope_full: RopeConfig
    """Rotary settings of full-attention layers."""
    rope_sliding: RopeConfig
    """Rotary settings of sliding-window layers."""
    tie_word_embeddings: bool
    activation: str
    """'silu' or 'gelu_tanh' (gated MLP either way)."""
    qkv_bias: bool = False
    qk_norm: bool = False
    sandwich_norm: bool = False
    """Gemma: extra RMSNorms after attention and after the MLP."""
    norm_plus_one: bool = False
    """Gemma: RMSNorm scales by (1 + w)."""
    embed_scale: float = 1.0
    attn_scale: float = 0.0
    """Softmax scale; derived from head_dim when 0."""
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    num_mtp_layers: int = 0
    """Multi-token-prediction modules the checkpoint ships after its decoder layers (DeepSeek-V3 style,
    `num_nextn_predict_layers`); their weights are layers num_layers.. and only speculative decoding uses them."""
    num_experts: int = 0
    """Routed experts of a mixture-of-experts layer (0: a dense model)."""
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    """Renormalize each token's top-k routing weights to sum to one."""
    moe_layers: tuple[bool, ...] = ()
    """Per layer: whether its feed-forward is the mixture of experts (empty for a dense model)."""
    moe: MoEConfig = MoEConfig()
    mla: MLAConfig | None = None
    """Latent attention (DeepSeek-V3); head_dim is then the rotary dims, which the rope tables are built for."""

    @property
    def kv_cache_layout(self) -> tuple[int, int]:
        """(heads, dim) of the K and of the V tensor the cache holds per token and layer. MLA's latent is split
        in two halves stored as "K" and "V" (padded by one where odd), so the cache, its tiers and its transfers
        keep one shape for both while holding the latent's bytes only."""
        if self.mla is not None:
            return 1, -(-self.mla.latent_dim // 2)
        return self.num_kv_heads, self.head_dim

    def is_moe_layer(self, layer: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer]

    @property
    def softmax_scale(self) -> float:
        if self.mla is not None:
            scale = self.attn_scale or (self.mla.qk_nope_head_dim + self.mla.qk_rope_head_dim) ** -0.5
            yarn = self.rope_full.scaling or {}
            if yarn.get("rope_type", yarn.get("type")) == "yarn" and yarn.get("mscale_all_dim"):
                # DeepSeek scales every query-key product (rotary dims or not) by YaRN's mscale, squared
                from tokenfab.models.layers import yarn_mscale

                scale *= yarn_mscale(float(yarn["factor"]), float(yarn["mscale_all_dim"])) ** 2
            return scale
        return self.attn_scale or self.head_dim**-0.5

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def window_groups(self) -> dict[int | None, list[int]]:
        """Layers grouped by sliding window, in first-seen order; one KV pool per group."""
        groups: dict[int | None, list[int]] = {}
        for layer, window in enumerate(self.layer_windows):
            groups.setdefault(window, []).append(layer)
        return groups

    @property
    def num_params(self) -> int:
        return self._params(self.num_experts)

    @property
    def active_params(self) -> int:
        """Parameters one token computes with: a MoE layer's k routed experts, not all of them."""
        return self._params(self.num_experts_per_tok)

    def _params(self, experts: int) -> int:
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        if self.mla is not None:
            m, h = self.mla, self.hidden_size
            q_dim = self.num_heads * (m.qk_nope_head_dim + m.qk_rope_head_dim)
            q = h * q_dim if m.q_lora_rank is None else m.q_lora_rank * (h + q_dim)
            kv = h * m.latent_dim + m.kv_lora_rank * self.num_heads * (m.qk_nope_head_dim + m.v_head_dim)
            attn = q + kv + self.num_heads * m.v_head_dim * h
        experts += self.moe.num_shared_experts
        moe = sum(self.moe_layers)
        dense_mlp = 3 * self.hidden_size * self.intermediate_size * (self.num_layers - moe)
        expert = 3 * self.hidden_size * self.moe_intermediate_size
        moe_mlp = moe * (expert * experts + self.hidden_size * self.num_experts)  # + the router
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * attn + dense_mlp + moe_mlp + embed

    def flops_per_token(self, context: int = 0) -> float:
        """Forward FLOPs for one token that samples (LM head included) at a given context length."""
        dense = 2 * (self.active_params - self.vocab_size * self.hidden_size)
        attention = 4 * self.num_layers * self.num_heads * self.head_dim * context
        return float(dense + 2 * self.vocab_size * self.hidden_size + attention)


def _eos_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def _layer_windows(cfg: dict[str, Any], model_type: str, num_layers: int) -> tuple[int | None, ...]:
    window = cfg.get("sliding_window")
    if model_type.startswith("gemma3"):
        layer_types = cfg.get("layer_types")
        if layer_types is None:
            pattern = int(cfg.get("sliding_window_pattern", 6))
            layer_types = [
                "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(num_layers)
            ]
        return tuple(window if t == "sliding_attention" else None for t in layer_types)
    if model_type in ("qwen2", "qwen3"):
        if not cfg.get("use_sliding_window", False) or window is None:
            return (None,) * num_layers
        max_window_layers = int(cfg.get("max_window_layers", num_layers))
        return tuple(window if i >= max_window_layers else None for i in range(num_layers))
    return (window,) * num_layers if window else (None,) * num_layers


def _rope(params: dict[str, Any], default_theta: float) -> RopeConfig:
    theta = float(params.get("rope_theta", default_theta))
    kind = params.get("rope_type", params.get("type", "default"))
    scaling = None if kind == "default" else {k: v for k, v in params.items() if k != "rope_theta"}
    return RopeConfig(theta, scaling)


def _rope_configs(cfg: dict[str, Any], gemma: bool) -> tuple[RopeConfig, RopeConfig]:
    """(full, sliding) rotary settings from either config style: transformers >= 5 `rope_parameters` (flat, or
    keyed by layer type) or the older rope_theta / rope_scaling / rope_local_base_freq fields."""
    params = cfg.get("rope_parameters")
    if params and "full_attention" in params:
        full = _rope(params["full_attention"], 10000.0)
        return full, _rope(params.get("sliding_attention", params["full_attention"]), 10000.0)
    if params:
        full = _rope(params, 10000.0)
    else:
        full = _rope({**(cfg.get("rope_scaling") or {}), "rope_theta": cfg.get("rope_theta", 10000.0)}, 10000.0)
    sliding = RopeConfig(float(cfg.get("rope_local_base_freq", 10000.0)), None) if gemma else full
    return full, sliding


def arch_from_hf_config(cfg: dict[str, Any]) -> ArchConfig:
    """Translate an HF config.json dict (or a multimodal Gemma 3 one with text_config) into an ArchConfig."""
    if "text_config" in cfg and cfg.get("model_type") == "gemma3":
        cfg = {**cfg["text_config"], "model_type": "gemma3_text"}
    model_type = cfg.get("model_type", "")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported model_type {model_type!r}; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    gemma = model_type.startswith("gemma3")
    hidden = int(cfg["hidden_size"])
    heads = int(cfg["num_attention_heads"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    mla = _mla(cfg) if model_type == "deepseek_v3" else None
    if mla is not None:
        head_dim = mla.qk_rope_head_dim
    num_layers = int(cfg["num_hidden_layers"])
    rope_full, rope_sliding = _rope_configs(cfg, gemma)
    activation = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
    num_experts = int(cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts") or 0)
    return ArchConfig(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=num_layers,
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        layer_windows=_layer_windows(cfg, model_type, num_layers),
        rope_full=rope_full,
        rope_sliding=rope_sliding,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", gemma)),
        activation="gelu_tanh" if activation in ("gelu_pytorch_tanh", "gelu_tanh", "gelu") else "silu",
        qkv_bias=bool(cfg.get("attention_bias", model_type == "qwen2")),
        qk_norm=gemma or model_type in ("qwen3", "qwen3_moe"),
        sandwich_norm=gemma,
        norm_plus_one=gemma,
        embed_scale=math.sqrt(hidden) if gemma else 1.0,
        attn_scale=float(cfg.get("query_pre_attn_scalar", head_dim)) ** -0.5 if gemma else 0.0,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        num_mtp_layers=int(cfg.get("num_nextn_predict_layers") or 0),
        num_experts=num_experts,
        num_experts_per_tok=int(cfg.get("num_experts_per_tok") or 0) if num_experts else 0,
        moe_intermediate_size=int(cfg.get("moe_intermediate_size") or cfg["intermediate_size"]) if num_experts else 0,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", True)),
        moe_layers=_moe_layers(cfg, num_layers, num_experts),
        moe=_moe(cfg) if model_type == "deepseek_v3" else MoEConfig(),
        mla=mla,
    )


def _mla(cfg: dict[str, Any]) -> MLAConfig:
    q_rank = cfg.get("q_lora_rank")
    return MLAConfig(
        kv_lora_rank=int(cfg["kv_lora_rank"]),
        q_lora_rank=int(q_rank) if q_rank else None,
        qk_nope_head_dim=int(cfg["qk_nope_head_dim"]),
        qk_rope_head_dim=int(cfg["qk_rope_head_dim"]),
        v_head_dim=int(cfg["v_head_dim"]),
        rope_interleave=bool(cfg.get("rope_interleave", True)),
    )


def _moe(cfg: dict[str, Any]) -> MoEConfig:
    if cfg.get("topk_method", "noaux_tc") != "noaux_tc" or cfg.get("scoring_func", "sigmoid") != "sigmoid":
        raise ValueError("DeepSeek-V3 routing is sigmoid scoring with noaux_tc top-k; this checkpoint asks otherwise")
    return MoEConfig(
        scoring="sigmoid",
        num_groups=int(cfg.get("n_group") or 1),
        topk_groups=int(cfg.get("topk_group") or 1),
        routed_scaling_factor=float(cfg.get("routed_scaling_factor", 1.0)),
        num_shared_experts=int(cfg.get("n_shared_experts") or 0),
    )


def _moe_layers(cfg: dict[str, Any], num_layers: int, num_experts: int) -> tuple[bool, ...]:
    """Mixtral: every layer; Qwen3-MoE: every `decoder_sparse_step`-th layer not in `mlp_only_layers`;
    DeepSeek-V3: every layer from `first_k_dense_replace` on (every `moe_layer_freq`-th)."""
    if not num_experts:
        return ()
    if "first_k_dense_replace" in cfg:
        first, freq = int(cfg["first_k_dense_replace"]), int(cfg.get("moe_layer_freq") or 1)
        return tuple(i >= first and i % freq == 0 for i in range(num_layers))
    step = int(cfg.get("decoder_sparse_step") or 1)
    dense = set(cfg.get("mlp_only_layers") or ())
    return tuple(i not in dense and (i + 1) % step == 0 for i in range(num_layers))
