"""ArchConfig: the one description of a decoder-only model the engine needs, derived from an HF config dict.

Llama, Mistral, Qwen2, Qwen3 and Gemma 3 differ only in a handful of switches (norm style, QK-norm, sandwich
norms, activation, biases, per-layer sliding windows and rope bases), so one model class serves them all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text", "gemma3")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary embedding of one layer type."""

    theta: float
    """Base frequency."""
    scaling: dict[str, Any] | None = None
    """HF rope_scaling dict (types: linear, llama3) or None."""


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

    @property
    def softmax_scale(self) -> float:
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
        attn = self.hidden_size * (self.q_size + 2 * self.kv_size) + self.q_size * self.hidden_size
        mlp = 3 * self.hidden_size * self.intermediate_size
        embed = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * (attn + mlp) + embed

    def flops_per_token(self, context: int = 0) -> float:
        """Forward FLOPs for one token that samples (LM head included) at a given context length."""
        dense = 2 * (self.num_params - self.vocab_size * self.hidden_size)
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
    num_layers = int(cfg["num_hidden_layers"])
    rope_full, rope_sliding = _rope_configs(cfg, gemma)
    activation = cfg.get("hidden_activation") or cfg.get("hidden_act") or "silu"
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
        qk_norm=gemma or model_type == "qwen3",
        sandwich_norm=gemma,
        norm_plus_one=gemma,
        embed_scale=math.sqrt(hidden) if gemma else 1.0,
        attn_scale=float(cfg.get("query_pre_attn_scalar", head_dim)) ** -0.5 if gemma else 0.0,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg.get("eos_token_id")),
        num_mtp_layers=int(cfg.get("num_nextn_predict_layers") or 0),
    )
