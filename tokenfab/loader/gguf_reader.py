"""Read a GGUF file into the HF convention: a config.json-style dict, HF-named tensors and a tokenizer.

The rest of the engine never sees llama.cpp names or layouts. Config values, tensor transforms and
the tokenizer pipeline follow what transformers' own GGUF loader produces for the same file, so a
GGUF and its HF conversion load into identical models.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gguf import GGUFReader, ReaderTensor
from gguf.quants import dequantize
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

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

_TOKEN_ID_KEYS = {
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

# GGUF token types (llama.cpp's llama_token_type).
_CONTROL, _USER_DEFINED = 3, 4

_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# tokenizer.ggml.pre -> the regex its byte-level merges were learned under.
_PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "megrez"), _QWEN2_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4"), _GPT4O_SPLIT),
}


# ---------------------------------------------------------------------------------------------- metadata


@functools.lru_cache(maxsize=2)
def _open_reader(path: str, mtime_ns: int, size: int) -> GGUFReader:
    del mtime_ns, size  # part of the cache key only, so a rewritten file is read afresh
    return GGUFReader(path)


def _reader(path: str | os.PathLike[str]) -> GGUFReader:
    # Parsing a 262k-token vocabulary takes seconds; config, tensors and tokenizer share one parse.
    resolved = Path(path).resolve()
    stat = resolved.stat()
    return _open_reader(str(resolved), stat.st_mtime_ns, stat.st_size)


def _value(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _architecture(reader: GGUFReader) -> str:
    arch = _value(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ValueError(f"GGUF architecture {arch!r} is not supported; supported: {SUPPORTED_ARCHITECTURES}")
    return arch


def _model_type(reader: GGUFReader, arch: str) -> str:
    if arch == "gemma3":
        return "gemma3_text"  # a gemma3 GGUF holds only the text backbone
    # transformers tests `"mistral" in [general.name]`, a list membership: only the exact name counts.
    if arch == "llama" and _value(reader, "general.name") == "mistral":
        return "mistral"
    return arch


def _tensor_names(reader: GGUFReader) -> set[str]:
    return {tensor.name for tensor in reader.tensors}


# ------------------------------------------------------------------------------------------------ config


def read_gguf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The HF config.json equivalent of a GGUF file, with the values transformers derives for it."""
    reader = _reader(path)
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
        value = _value(reader, f"{arch}.{suffix}")
        if value is not None:
            stated[hf_key] = value
    for hf_key, gguf_key in _TOKEN_ID_KEYS.items():
        value = _value(reader, gguf_key)
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
    reader = _reader(path)
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


# --------------------------------------------------------------------------------------------- tokenizer


def read_gguf_tokenizer(path: str | os.PathLike[str]) -> tuple[Tokenizer, dict[str, Any]]:
    """The file's tokenizer, built as transformers builds it from GGUF, and its special-token facts.

    The dict holds bos/eos/pad/unk ids and strings, add_bos_token, add_eos_token, chat_template
    (None when the file has none) and stop_token_ids. eos_token_id lists every id that ends a
    generation when there is more than one (Gemma's <end_of_turn>), else it is the single int.
    """
    reader = _reader(path)
    arch = _value(reader, "general.architecture")
    vocab = _GgufVocab.read(reader)
    tokenizer = _build_backend(arch, vocab)
    _add_gguf_added_tokens(tokenizer, vocab)
    info = _special_token_info(reader, arch, vocab)
    _add_named_special_tokens(tokenizer, info)
    tokenizer.post_processor = _template_processor(tokenizer, info)
    return tokenizer, info


class _GgufVocab:
    """The tokenizer.ggml.* arrays of a file."""

    def __init__(
        self,
        model: str,
        pre: str | None,
        tokens: list[str],
        scores: list[float] | None,
        token_types: list[int],
        merges: list[str] | None,
        add_space_prefix: bool | None,
    ) -> None:
        self.model = model
        self.pre = pre
        self.tokens = tokens
        self.scores = scores
        self.token_types = token_types
        self.merges = merges
        self.add_space_prefix = add_space_prefix

    @classmethod
    def read(cls, reader: GGUFReader) -> _GgufVocab:
        tokens = _value(reader, "tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError("GGUF file has no tokenizer.ggml.tokens")
        return cls(
            model=_value(reader, "tokenizer.ggml.model"),
            pre=_value(reader, "tokenizer.ggml.pre"),
            tokens=tokens,
            scores=_value(reader, "tokenizer.ggml.scores"),
            token_types=_value(reader, "tokenizer.ggml.token_type", []),
            merges=_value(reader, "tokenizer.ggml.merges"),
            add_space_prefix=_value(reader, "tokenizer.ggml.add_space_prefix"),
        )


def _build_backend(arch: str, vocab: _GgufVocab) -> Tokenizer:
    if vocab.model == "llama" and arch in ("gemma", "gemma2", "gemma3"):
        return _gemma_backend(vocab)
    if vocab.model == "llama":
        return _sentencepiece_backend(vocab)
    if vocab.model == "gpt2":
        return _byte_level_backend(vocab)
    raise ValueError(f"GGUF tokenizer model {vocab.model!r} is not supported (llama and gpt2 are)")


def _gemma_backend(vocab: _GgufVocab) -> Tokenizer:
    # llama.cpp stores Gemma's whitespace-run tokens with real spaces where the model spells them "▁".
    tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in vocab.tokens]
    ids = {token: index for index, token in enumerate(tokens)}
    # Gemma's scores do not follow its merge order; the token order in the file does.
    ranks = {token: -index for index, token in enumerate(tokens)}
    model = BPE(
        vocab=ids,
        merges=merges_from_vocab(ids, ranks),
        fuse_unk=True,
        unk_token="<unk>",
        dropout=None,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous", invert=False)
    tokenizer.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    return tokenizer


def _sentencepiece_backend(vocab: _GgufVocab) -> Tokenizer:
    ids = {token: index for index, token in enumerate(vocab.tokens)}
    if vocab.merges is not None:
        merges = [(left, right) for left, _, right in (merge.partition(" ") for merge in vocab.merges)]
    else:
        scores = vocab.scores or [0.0] * len(vocab.tokens)
        merges = merges_from_vocab(ids, dict(zip(vocab.tokens, scores, strict=False)))
    tokenizer = Tokenizer(BPE(vocab=ids, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
    # transformers always prepends; llama.cpp follows the file's flag, which only ever disables it.
    prefix = vocab.add_space_prefix is not False
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _byte_level_backend(vocab: _GgufVocab) -> Tokenizer:
    if vocab.merges is None:
        raise ValueError("byte-level GGUF tokenizer has no tokenizer.ggml.merges")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    ids = {
        token if set(token) <= alphabet else "".join(spelling[byte] for byte in token.encode("utf-8")): index
        for index, token in enumerate(vocab.tokens)
    }
    merges = [(left, right) for left, _, right in (merge.partition(" ") for merge in vocab.merges)]
    tokenizer = Tokenizer(
        BPE(vocab=ids, merges=merges, dropout=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    split = _PRE_TOKENIZER_SPLITS.get(vocab.pre or "")
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(split), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def merges_from_vocab(vocab: dict[str, int], ranks: Mapping[str, float]) -> list[tuple[str, str]]:
    """BPE merges implied by a vocabulary: every split of a token into two tokens, best-ranked first.

    Same order as transformers' generate_merges: by rank, then longer left and right pieces first,
    ties kept in (token, then left-piece id) order.
    """
    merges: list[tuple[str, str, float]] = []
    for piece, rank in ranks.items():
        local = [
            (piece[:cut], piece[cut:], rank)
            for cut in range(1, len(piece))
            if piece[:cut] in vocab and piece[cut:] in vocab
        ]
        local.sort(key=lambda merge: (vocab[merge[0]], vocab[merge[1]]))
        merges.extend(local)
    merges.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


@functools.lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table that byte-level vocabularies are spelled in."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {byte: chr(byte) for byte in printable}
    shifted = 0
    for byte in range(256):
        if byte not in table:
            table[byte] = chr(256 + shifted)
            shifted += 1
    return dict(sorted(table.items()))


def _add_gguf_added_tokens(tokenizer: Tokenizer, vocab: _GgufVocab) -> None:
    # Control tokens (<start_of_turn>, <|im_end|>) must match whole and count as special; user-defined
    # ones ("\n\n", <think>) match whole but are ordinary text.
    alphabet = set(bytes_to_unicode().values()) if vocab.model == "gpt2" else None
    control = [
        AddedToken(token, normalized=False, special=True)
        for token, kind in zip(vocab.tokens, vocab.token_types, strict=False)
        # a control token outside the byte alphabet is a llama.cpp mislabel that would grow the vocab
        if kind == _CONTROL and (alphabet is None or set(token) <= alphabet)
    ]
    if control:
        tokenizer.add_special_tokens(control)
    known = tokenizer.get_vocab(with_added_tokens=True)
    user_defined = [
        AddedToken(token, normalized=False, special=False)
        for token, kind in zip(vocab.tokens, vocab.token_types, strict=False)
        if kind == _USER_DEFINED and token in known
    ]
    if user_defined:
        tokenizer.add_tokens(user_defined)


def _special_token_info(reader: GGUFReader, arch: str, vocab: _GgufVocab) -> dict[str, Any]:
    info: dict[str, Any] = {}
    for hf_key, gguf_key in _TOKEN_ID_KEYS.items():
        token_id = _value(reader, gguf_key)
        info[hf_key] = token_id
        info[hf_key.removesuffix("_id")] = vocab.tokens[token_id] if token_id is not None else None
    add_bos = _value(reader, "tokenizer.ggml.add_bos_token")
    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
    info["add_bos_token"] = bool(add_bos) if add_bos is not None else vocab.model == "llama"
    info["add_eos_token"] = bool(_value(reader, "tokenizer.ggml.add_eos_token", False))
    info["chat_template"] = _value(reader, "tokenizer.chat_template")
    stops = _stop_token_ids(reader, arch, vocab, info["eos_token_id"])
    info["stop_token_ids"] = stops
    if len(stops) > 1:
        info["eos_token_id"] = stops
    return info


def _stop_token_ids(reader: GGUFReader, arch: str, vocab: _GgufVocab, eos: int | None) -> list[int]:
    stops = [eos] if eos is not None else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        token_id = _value(reader, key)
        if token_id is not None and token_id not in stops:
            stops.append(token_id)
    if arch.startswith("gemma") and "<end_of_turn>" in vocab.tokens:
        # Gemma's chat turns end with <end_of_turn>, which its generation_config lists beside <eos>.
        end_of_turn = vocab.tokens.index("<end_of_turn>")
        if end_of_turn not in stops:
            stops.append(end_of_turn)
    return stops


def _add_named_special_tokens(tokenizer: Tokenizer, info: dict[str, Any]) -> None:
    for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
        token = info[name]
        if token is None:
            continue
        token_id = tokenizer.token_to_id(token)
        existing = tokenizer.get_added_tokens_decoder().get(token_id) if token_id is not None else None
        if existing is None or existing.content != token:
            tokenizer.add_special_tokens([AddedToken(token, normalized=False, special=True)])


def _template_processor(tokenizer: Tokenizer, info: dict[str, Any]) -> processors.TemplateProcessing:
    bos, eos = info["bos_token"], info["eos_token"]
    add_bos = bool(info["add_bos_token"] and bos is not None)
    add_eos = bool(info["add_eos_token"] and eos is not None)
    single = f"{f'{bos}:0 ' if add_bos else ''}$A:0{f' {eos}:0' if add_eos else ''}"
    pair = f"{single}{f' {bos}:1' if add_bos else ''} $B:1{f' {eos}:1' if add_eos else ''}"
    special = [(bos, tokenizer.token_to_id(bos))] if add_bos else []
    if add_eos:
        special.append((eos, tokenizer.token_to_id(eos)))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)
