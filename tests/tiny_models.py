"""Tiny random-weight HF checkpoints (Llama, Qwen2, Qwen3, Gemma 3, Qwen3-MoE, Mixtral, DeepSeek-V3) written to disk
for engine tests."""

from __future__ import annotations

import json
from pathlib import Path

import torch

VOCAB = 512

_CONFIGS = {
    "llama": dict(model_type="llama", architectures=["LlamaForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False),
    "qwen2": dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                  rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True),
    "qwen3": dict(model_type="qwen3", architectures=["Qwen3ForCausalLM"], hidden_size=64, intermediate_size=128,
                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                  max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=True),
    "gemma3": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=64,
                   intermediate_size=128, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=1,
                   head_dim=32, max_position_embeddings=1024, rms_norm_eps=1e-6, rope_theta=1000000.0,
                   rope_local_base_freq=10000.0, sliding_window=24, query_pre_attn_scalar=32,
                   layer_types=["sliding_attention"] * 5 + ["full_attention"],
                   hidden_activation="gelu_pytorch_tanh", tie_word_embeddings=True),
    # Layer 1 of 3 dense (mlp_only_layers), 8 experts, top 2, not renormalized: both of Qwen3-MoE's switches.
    "qwen3_moe": dict(model_type="qwen3_moe", architectures=["Qwen3MoeForCausalLM"], hidden_size=64,
                      intermediate_size=96, moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                      norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[1], num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                      rms_norm_eps=1e-6, rope_theta=10000.0, tie_word_embeddings=False),
    "mixtral": dict(model_type="mixtral", architectures=["MixtralForCausalLM"], hidden_size=64,
                    intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, rms_norm_eps=1e-6,
                    rope_theta=10000.0, sliding_window=None, tie_word_embeddings=False),
    # MLA with a q bottleneck, 1 dense layer then 2 MoE layers: 8 routed experts in 4 groups (top 2 groups), top 3,
    # one shared expert; the correction bias is randomized with the rest, so it changes which experts are picked.
    "deepseek_v3": dict(model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], hidden_size=64,
                        intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
                        num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                        first_k_dense_replace=1, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
                        q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                        num_nextn_predict_layers=0, max_position_embeddings=1024, rms_norm_eps=1e-6,
                        rope_theta=10000.0, tie_word_embeddings=False),
}


CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}w10 {{ m['role'] }} {{ m['content'] }} w11 {% endfor %}"
                 "{% if add_generation_prompt %}w12{% endif %}")
"""Roles and contents become words of the tiny vocabulary (unknown words map to w3)."""


def _tokenizer_json(vocab: int) -> dict:
    words = {f"w{i}": i for i in range(vocab)}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
        "normalizer": None, "pre_tokenizer": {"type": "WhitespaceSplit"}, "post_processor": None,
        "decoder": None, "model": {"type": "WordLevel", "vocab": words, "unk_token": "w3"},
    }


def write_tiny_model(kind: str, directory: Path, seed: int = 0, **overrides) -> Path:
    """Random-weight checkpoint of one architecture, in HF layout, loadable by transformers and tokenfab
    (`overrides`: config fields to change, e.g. max_position_embeddings)."""
    import transformers

    cfg = dict(_CONFIGS[kind], vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               torch_dtype="float32", **overrides)
    config = transformers.AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if kind == "gemma3" else 1.0, 0.1)
            else:
                p.normal_(0.0, 0.08)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # DeepSeek-V3: steers which experts are chosen
                b.normal_(0.0, 0.05)
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "tokenizer.json").write_text(json.dumps(_tokenizer_json(VOCAB)))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "w2",
                                                                 "add_bos_token": True,
                                                                 "chat_template": CHAT_TEMPLATE}))
    return directory


def add_mtp_modules(directory: Path, num_modules: int, copy_tokens: bool, seed: int = 0) -> Path:
    """Give a tiny checkpoint DeepSeek-V3-style MTP modules (layers num_layers.. plus num_nextn_predict_layers).

    copy_tokens: make each module predict the token it is fed (eh_proj passes the token embedding through and
    the block adds little), so its drafts are accepted wherever the model repeats a token; otherwise random.
    """
    from safetensors.torch import save_file

    cfg = json.loads((directory / "config.json").read_text())
    h, heads, kv_heads = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    head_dim = cfg.get("head_dim") or h // heads
    inter, first = cfg["intermediate_size"], cfg["num_hidden_layers"]
    g = torch.Generator().manual_seed(seed)
    block_scale = 0.01 if copy_tokens else 0.08
    gemma = cfg["model_type"].startswith("gemma")
    one = torch.zeros(h) if gemma else torch.ones(h)  # Gemma stores RMSNorm scales as w in (1 + w)

    def rand(*shape, scale=0.08):
        return torch.randn(*shape, generator=g) * scale

    tensors = {}
    for j in range(num_modules):
        p = f"model.layers.{first + j}."
        eh = torch.cat([torch.eye(h), torch.zeros(h, h)], dim=1) if copy_tokens else rand(h, 2 * h)
        tensors.update({
            p + "self_attn.q_proj.weight": rand(heads * head_dim, h), p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, h),
            p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, h),
            p + "self_attn.o_proj.weight": rand(h, heads * head_dim, scale=block_scale),
            p + "mlp.gate_proj.weight": rand(inter, h), p + "mlp.up_proj.weight": rand(inter, h),
            p + "mlp.down_proj.weight": rand(h, inter, scale=block_scale),
            p + "input_layernorm.weight": one, p + "post_attention_layernorm.weight": one,
            p + "enorm.weight": one, p + "hnorm.weight": one, p + "eh_proj.weight": eh,
            p + "shared_head.norm.weight": one,
        })
        if gemma:
            norm = torch.zeros(head_dim)
            tensors.update({p + "pre_feedforward_layernorm.weight": one, p + "post_feedforward_layernorm.weight": one,
                            p + "self_attn.q_norm.weight": norm, p + "self_attn.k_norm.weight": norm})
        if cfg.get("attention_bias", cfg["model_type"] == "qwen2"):
            tensors[p + "self_attn.q_proj.bias"] = torch.zeros(heads * head_dim)
            tensors[p + "self_attn.k_proj.bias"] = torch.zeros(kv_heads * head_dim)
            tensors[p + "self_attn.v_proj.bias"] = torch.zeros(kv_heads * head_dim)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(directory / "mtp.safetensors"))
    cfg["num_nextn_predict_layers"] = num_modules
    (directory / "config.json").write_text(json.dumps(cfg))
    return directory
