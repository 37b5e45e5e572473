"""Read a GGUF file into the HF convention: a config.json-style dict and HF-named tensors (the tokenizer:
gguf_tokenizer).

The rest of the engine never sees llama.cpp names or layouts. Config values, tensor transforms and
the tokenizer pipeline follow what transformers' own GGUF loader produces for the same file, so a
GGUF and its HF conversion load into identical models.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize

SUPPORTED_ARCHITECTURES = ("gemma3", "llama", "qwen2", "qwen3")

# llama.cpp key suffix (under "<arch>.") -> HF config key, shared by every supported architecture.
_COMMON_KEYS = {
    "context_length": "max_position_embeddings",
    "block_count": "num_hidden_layers",
    "feed_forward_length": "intermediate_size",
    "embedding_length": "hidden_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}

# Qwen3 reads key_length although transformers does not: every released Qwen3 has 128 there, which is
# also the class default transformers falls back to, and a file saying otherwise needs its own value.
_ARCH_KEYS = {
    "llama": {"rope.dimension_count": "head_dim"},
    "qwen2": {},
    "qwen3": {"attention.key_length": "head_dim"},
    "gemma3": {"attention.key_length": "head_dim", "attention.sliding_window": "sliding_window"},
}

# HF special-token id key -> GGUF key (the config and the tokenizer both state them).
TOKEN_ID_KEYS = {
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "unk_token_id": "tokenizer.ggml.unknown_token_id",
    "pad_token_id": "tokenizer.ggml.padding_token_id",
}

# What the HF config classes fall back to for values a GGUF does not state, per model_type.
_CONFIG_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
    },
    "mistral": {
        "hidden_act": "silu",
        "max_position_embeddings": 4096 * 32,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pad_token_id": None,
    },
    "qwen2": {
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 28,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    },
    "qwen3": {
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "head_dim": 128,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": 28,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "use_cache": True,
        "bos_token_id": None,
        "eos_token_id": None,
        "pad_token_id": None,
    },
    "gemma3_text": {
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": 131072,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "query_pre_attn_scalar": 256,
        "sliding_window": 4096,
        "sliding_window_pattern": 6,
        "final_logit_softcapping": None,
        "attn_logit_softcapping": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_bidirectional_attention": False,
        "initializer_range": 0.02,
        "use_cache": True,
        "head_dim": 256,
        "bos_token_id": 2,
        "eos_token_id": 1,
        "pad_token_id": 0,
    },
}

_ARCHITECTURE_CLASSES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}

_LAYER_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "attn_norm": "input_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# Gemma has four norms per layer where llama has two, so ffn_norm means something else there.
_ARCH_LAYER_TENSORS = {
    "gemma3": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    }
}
_DEFAULT_LAYER_TENSORS = {"ffn_norm": "post_attention_layernorm"}

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

# Present in some llama 3 files for llama.cpp's rope scaling; HF models have no such parameter.
_IGNORED_TENSORS = frozenset({"rope_freqs.weight"})

# ---------------------------------------------------------------------------------------------- metadata


@functools.lru_cache(maxsize=2)
def _open_reader(path: str, mtime_ns: int, size: int) -> GGUFReader:
    del mtime_ns, size  # part of the cache key only, so a rewritten file is read afresh
    return GGUFReader(path)


def cached_reader(path: str | os.PathLike[str]) -> GGUFReader:
    """The file parsed once: a 262k-token vocabulary takes seconds, and config, tensors and tokenizer share it."""
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _open_reader(str(resolved), stat.st_mtime_ns, stat.st_size)


def field_value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    """A metadata field's value, or `default` where the file has none."""
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _architecture(reader: GGUFReader) -> str:
    arch = field_value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}")
    return arch


def _model_type(reader: GGUFReader, arch: str) -> str:
    if arch == "gemma3":
        return "gemma3_text"  # a gemma3 GGUF holds only the text backbone
    # transformers tests `"mistral" in [general.name]`, a list membership: only the exact name counts.
    if arch == "llama" and field_value(reader, "general.name") == "mistral":
        return "mistral"
    return arch


def _tensor_names(reader: GGUFReader) -> set[str]:
    return {tensor.name for tensor in reader.tensors}


# ------------------------------------------------------------------------------------------------ config


def read_gguf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The HF config.json equivalent of a GGUF file, with the values transformers derives for it."""
    reader = cached_reader(path)
    arch = _architecture(reader)
    model_type = _model_type(reader, arch)
    stated = _stated_config(reader, arch)
    config: dict[str, Any] = {"model_type": model_type, "architectures": [_ARCHITECTURE_CLASSES[model_type]]}
    config.update(_CONFIG_DEFAULTS[model_type])
    config.update(stated)
    for required in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"):
        if required not in config:
            raise ValueError(f"{path}: GGUF metadata lacks {arch}.* for {required}")
    config.setdefault("num_key_value_heads", config["num_attention_heads"])
    config.setdefault("head_dim", config["hidden_size"] // config["num_attention_heads"])
    config["tie_word_embeddings"] = "output.weight" not in _tensor_names(reader)
    _add_layer_types(config, model_type)
    _add_rope(config, model_type)
    return config


def _stated_config(reader: GGUFReader, arch: str) -> dict[str, Any]:
    stated: dict[str, Any] = {}
    for suffix, hf_key in {**_COMMON_KEYS, **_ARCH_KEYS[arch]}.items():
        value = field_value(reader, f"{arch}.{suffix}")
        if value is not None:
            stated[hf_key] = value
    for hf_key, gguf_key in TOKEN_ID_KEYS.items():
        value = field_value(reader, gguf_key)
        if value is not None:
            stated[hf_key] = value
    if "vocab_size" not in stated:
        tokens = reader.get_field("tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError("GGUF states neither a vocab_size nor a token list")
        stated["vocab_size"] = len(tokens.data)
    return stated


def _add_layer_types(config: dict[str, Any], model_type: str) -> None:
    layers = config["num_hidden_layers"]
    if model_type == "gemma3_text":
        # GGUF does not record the pattern; llama.cpp and transformers both hard-code 5 local : 1 global.
        pattern = config["sliding_window_pattern"]
        config["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)]
    elif model_type in ("qwen2", "qwen3"):
        config["layer_types"] = ["full_attention"] * layers


def _add_rope(config: dict[str, Any], model_type: str) -> None:
    # rope_theta / rope_local_base_freq / rope_scaling serve transformers 4.x and vLLM;
    # rope_parameters is the transformers 5 spelling of the same values.
    config["rope_scaling"] = None
    if model_type == "gemma3_text":
        config["rope_parameters"] = {
            "sliding_attention": {"rope_type": "default", "rope_theta": config["rope_local_base_freq"]},
            "full_attention": {"rope_type": "default", "rope_theta": config["rope_theta"]},
        }
    else:
        config["rope_parameters"] = {"rope_type": "default", "rope_theta": config["rope_theta"]}


# ----------------------------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class GGUFEntry:
    """One tensor of a GGUF file as stored, with what turns it into its HF counterpart."""

    hf_name: str
    tensor: ReaderTensor
    """The file's tensor: `tensor.data` holds its raw blocks, `tensor.tensor_type` their ggml type."""
    rope_heads: int | None
    """llama q/k: the file permutes rows within each of this many heads (see unpermute_rope_rows)."""
    norm_offset: float
    """Subtracted from the values (Gemma's norms are stored as 1 + w)."""

    @property
    def shape(self) -> tuple[int, ...]:
        """HF layout: ggml lists dimensions fastest-moving first."""
        return tuple(int(dim) for dim in reversed(self.tensor.shape.tolist()))

    def values(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized, in HF layout."""
        values = _dequantized(self.tensor)
        if self.norm_offset:
            values = values - np.float32(self.norm_offset)
        if self.rope_heads is not None:
            values = unpermute_rope_rows(values, self.rope_heads)
        return torch.from_numpy(values).to(dtype)


def iter_gguf_entries(path: str | os.PathLike[str]) -> Iterator[GGUFEntry]:
    """Every tensor of the file, in file order, with its HF name and transforms."""
    reader = cached_reader(path)
    arch = _architecture(reader)
    config = read_gguf_config(path)
    for tensor in reader.tensors:
        if tensor.name not in _IGNORED_TENSORS:
            # llama.cpp folds Gemma's (1 + w) into the stored norm weight; HF applies the +1 at runtime.
            offset = 1.0 if arch == "gemma3" and "norm.weight" in tensor.name else 0.0
            yield GGUFEntry(hf_tensor_name(tensor.name, arch), tensor, _rope_heads(tensor.name, arch, config), offset)


def iter_gguf_tensors(
    path: str | os.PathLike[str], dtype: torch.dtype = torch.float32
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, dequantized tensor in HF layout) one tensor at a time, in file order."""
    for entry in iter_gguf_entries(path):
        yield entry.hf_name, entry.values(dtype)


def hf_tensor_name(gguf_name: str, arch: str) -> str:
    """HF name of a GGUF tensor name: blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight."""
    stem, _, suffix = gguf_name.rpartition(".")
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{suffix}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if match is not None:
        layer, leaf = match.groups()
        names = {**_LAYER_TENSORS, **_ARCH_LAYER_TENSORS.get(arch, _DEFAULT_LAYER_TENSORS)}
        if leaf in names:
            return f"model.layers.{layer}.{names[leaf]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no HF counterpart for architecture {arch!r}")


def _dequantized(tensor: ReaderTensor) -> np.ndarray:
    # ggml lists dimensions fastest-moving first; torch wants them the other way round.
    shape = tuple(int(dim) for dim in reversed(tensor.shape.tolist()))
    values = dequantize(tensor.data, tensor.tensor_type)
    # F32 comes back as a read-only view of the memory map and is copied; dequantized blocks are already fresh.
    return np.require(values, dtype=np.float32, requirements=["C_CONTIGUOUS", "WRITEABLE"]).reshape(shape)


def _rope_heads(gguf_name: str, arch: str, config: dict[str, Any]) -> int | None:
    # llama.cpp permutes llama's q/k rows to turn HF's half-split rope into interleaved pairs.
    if arch != "llama":
        return None
    if ".attn_q." in gguf_name:
        return config["num_attention_heads"]
    if ".attn_k." in gguf_name:
        return config["num_key_value_heads"]
    return None


def unpermute_rope_rows(values: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation, which turns HF's half-split rope into interleaved pairs."""
    half = values.shape[0] // heads // 2
    grouped = values.reshape(heads, half, 2, *values.shape[1:])
    return np.ascontiguousarray(grouped.swapaxes(2, 1).reshape(values.shape))
