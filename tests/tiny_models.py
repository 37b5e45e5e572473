"""Tiny random-weight HF checkpoints (Llama, Qwen2, Qwen3, Gemma 3) written to disk for engine tests."""

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


def write_tiny_model(kind: str, directory: Path, seed: int = 0) -> Path:
    """Random-weight checkpoint of one architecture, in HF layout, loadable by transformers and tokenfab."""
    import transformers

    cfg = dict(_CONFIGS[kind], vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=0,
               torch_dtype="float32")
    config = transformers.AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.normal_(0.0 if kind == "gemma3" else 1.0, 0.1)
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(directory, safe_serialization=True)
    (directory / "tokenizer.json").write_text(json.dumps(_tokenizer_json(VOCAB)))
    (directory / "tokenizer_config.json").write_text(json.dumps({"bos_token": "w1", "eos_token": "w2",
                                                                 "add_bos_token": True,
                                                                 "chat_template": CHAT_TEMPLATE}))
    return directory
