"""A GGUF file's tokenizer, built as transformers builds it from the same file, and its special-token facts."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from gguf import GGUFReader
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from tokenfab.loader.gguf_reader import TOKEN_ID_KEYS, cached_reader, field_value

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


def read_gguf_tokenizer(path: str | os.PathLike[str]) -> tuple[Tokenizer, dict[str, Any]]:
    """The file's tokenizer, built as transformers builds it from GGUF, and its special-token facts.

    The dict holds bos/eos/pad/unk ids and strings, add_bos_token, add_eos_token, chat_template
    (None when the file has none) and stop_token_ids. eos_token_id lists every id that ends a
    generation when there is more than one (Gemma's <end_of_turn>), else it is the single int.
    """
    reader = cached_reader(path)
    arch = field_value(reader, "general.architecture")
    vocab = _GgufVocab.read(reader)
    tokenizer = _build_backend(arch, vocab)
    _add_gguf_added_tokens(tokenizer, vocab)
    info = _special_token_info(reader, arch, vocab)
    _add_named_special_tokens(tokenizer, info)
    tokenizer.post_processor = _template_processor(tokenizer, info)
    return tokenizer, info


@dataclass(frozen=True, slots=True)
class _GgufVocab:
    """The tokenizer.ggml.* arrays of a file."""

    model: str
    pre: str | None
    tokens: list[str]
    scores: list[float] | None
    token_types: list[int]
    merges: list[str] | None
    add_space_prefix: bool | None

    @classmethod
    def read(cls, reader: GGUFReader) -> _GgufVocab:
        tokens = field_value(reader, "tokenizer.ggml.tokens")
        if tokens is None:
            raise ValueError("GGUF file has no tokenizer.ggml.tokens")
        return cls(
            model=field_value(reader, "tokenizer.ggml.model"),
            pre=field_value(reader, "tokenizer.ggml.pre"),
            tokens=tokens,
            scores=field_value(reader, "tokenizer.ggml.scores"),
            token_types=field_value(reader, "tokenizer.ggml.token_type", []),
            merges=field_value(reader, "tokenizer.ggml.merges"),
            add_space_prefix=field_value(reader, "tokenizer.ggml.add_space_prefix"),
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
    for hf_key, gguf_key in TOKEN_ID_KEYS.items():
        token_id = field_value(reader, gguf_key)
        info[hf_key] = token_id
        info[hf_key.removesuffix("_id")] = vocab.tokens[token_id] if token_id is not None else None
    add_bos = field_value(reader, "tokenizer.ggml.add_bos_token")
    # llama.cpp adds BOS to a sentencepiece vocabulary unless the file says otherwise.
    info["add_bos_token"] = bool(add_bos) if add_bos is not None else vocab.model == "llama"
    info["add_eos_token"] = bool(field_value(reader, "tokenizer.ggml.add_eos_token", False))
    info["chat_template"] = field_value(reader, "tokenizer.chat_template")
    stops = _stop_token_ids(reader, arch, vocab, info["eos_token_id"])
    info["stop_token_ids"] = stops
    if len(stops) > 1:
        info["eos_token_id"] = stops
    return info


def _stop_token_ids(reader: GGUFReader, arch: str, vocab: _GgufVocab, eos: int | None) -> list[int]:
    stops = [eos] if eos is not None else []
    for key in ("tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id"):
        token_id = field_value(reader, key)
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
