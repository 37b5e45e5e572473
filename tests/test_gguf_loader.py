"""GGUF loader: config, tensors and tokenizer agree with transformers' own GGUF loader, and convert round-trips."""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import jinja2
import numpy as np
import pytest
import torch
import transformers
from safetensors import safe_open

from tokenfab.loader import default_model, gguf_reader
from tokenfab.loader.chat_templates import GEMMA3_CHAT_TEMPLATE, default_chat_template
from tokenfab.loader.convert import convert_gguf_to_hf, main
from tokenfab.loader.gguf_reader import hf_tensor_name, iter_gguf_tensors, read_gguf_config
from tokenfab.loader.gguf_tokenizer import bytes_to_unicode, merges_from_vocab, read_gguf_tokenizer

torch.set_num_threads(2)

TEXTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "def add(a: int, b: int) -> int:\n    return a + b\n",
    "for (int i = 0; i < n; ++i) { sum += x[i]; }",
    "   leading spaces and trailing   ",
    "tabs\tand\t\ttabs",
    "line one\nline two\n\n\nline five",
    "\n\n",
    "日本語のテキストと中文字符",
    "한국어 문장입니다",
    "Emoji 😀🚀👍🏽 and 🇫🇷 flags",
    "Café naïve façade résumé Ångström",
    "<start_of_turn>user\nHi there<end_of_turn>\n<start_of_turn>model\n",
    "<bos>already has bos",
    "Numbers 1234567890 and 3.14159e-10",
    "MixedCASE camelCase snake_case SCREAMING_CASE",
    "",
    " ",
    "Ünïcödé ∑∫√ ≤≥ → ← ™ ©",
    "url: https://example.com/path?q=1&r=2#frag",
]

# to_dict() keys that describe where a config came from rather than the model.
BOOKKEEPING = {"_name_or_path", "_model_name_or_path", "transformers_version", "architectures", "dtype",
               "torch_dtype", "_commit_hash", "quantization_config"}


# ------------------------------------------------------------------------------------------------ helpers


def assert_config_matches(ours: dict[str, Any], theirs: Any) -> None:
    """Ours rebuilds transformers' config exactly, and every field both have agrees."""
    rebuilt = transformers.AutoConfig.for_model(**ours).to_dict()
    expected = theirs.to_dict()
    for key in BOOKKEEPING:
        rebuilt.pop(key, None)
        expected.pop(key, None)
    mismatched = {key: (rebuilt.get(key), value) for key, value in expected.items() if rebuilt.get(key) != value}
    assert not mismatched
    for key, value in ours.items():
        if key not in BOOKKEEPING and key in expected:
            assert value == expected[key], key


def assert_encodes_like(ours: Any, theirs: Any, texts: list[str]) -> None:
    for text in texts:
        expected = theirs(text)["input_ids"]
        assert ours.encode(text).ids == expected, text
        bare = theirs(text, add_special_tokens=False)["input_ids"]
        assert ours.encode(text, add_special_tokens=False).ids == bare, text
        assert ours.decode(expected, skip_special_tokens=False) == theirs.decode(expected), text
        assert ours.decode(expected, skip_special_tokens=True) == theirs.decode(expected, skip_special_tokens=True)


# ------------------------------------------------------------------------------- real model (Gemma 3 270M)


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    return default_model.default_model_path()


@pytest.fixture(scope="module")
def shared_gguf_parse() -> Iterator[None]:
    """Let transformers parse the 262k-token metadata once instead of once per from_pretrained call.

    GGUFReader is read-only, so sharing one changes nothing but the time (seconds per parse).
    """
    cached = functools.lru_cache(maxsize=2)(gguf.GGUFReader)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gguf, "GGUFReader", lambda path, mode="r": cached(str(path), mode))
        yield


@pytest.fixture(scope="module")
def hf_model(gemma_path: Path, shared_gguf_parse: None) -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(
        gemma_path.parent, gguf_file=gemma_path.name, dtype=torch.float32
    ).eval()


@pytest.fixture(scope="module")
def hf_tokenizer(gemma_path: Path, shared_gguf_parse: None) -> Any:
    return transformers.AutoTokenizer.from_pretrained(gemma_path.parent, gguf_file=gemma_path.name)


@pytest.fixture(scope="module")
def gemma_tokenizer(gemma_path: Path) -> tuple[Any, dict[str, Any]]:
    return read_gguf_tokenizer(gemma_path)


@pytest.fixture(scope="module")
def converted(gemma_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return convert_gguf_to_hf(gemma_path, tmp_path_factory.mktemp("gemma3-hf"), dtype="float32")


@pytest.mark.slow
def test_gemma_tokenizer_encodes_like_transformers(gemma_tokenizer: tuple[Any, dict], hf_tokenizer: Any) -> None:
    tokenizer, _ = gemma_tokenizer
    assert_encodes_like(tokenizer, hf_tokenizer, TEXTS)
    assert tokenizer.encode("Hello").ids[0] == 2  # bos prepended, as transformers does
    assert tokenizer.encode("<start_of_turn>").ids == [2, 105]
    assert tokenizer.encode("a\n\nb", add_special_tokens=False).ids.count(108) == 1  # "\n\n" kept whole


@pytest.mark.slow
def test_gemma_tokenizer_pipeline_is_transformers_pipeline(
    gemma_tokenizer: tuple[Any, dict], hf_tokenizer: Any
) -> None:
    tokenizer, _ = gemma_tokenizer
    assert json.loads(tokenizer.to_str()) == json.loads(hf_tokenizer.backend_tokenizer.to_str())


@pytest.mark.slow
def test_gemma_special_tokens(gemma_tokenizer: tuple[Any, dict], hf_tokenizer: Any) -> None:
    tokenizer, info = gemma_tokenizer
    assert (info["bos_token_id"], info["pad_token_id"], info["unk_token_id"]) == (2, 0, 3)
    assert (info["bos_token"], info["eos_token"]) == ("<bos>", "<eos>")
    assert info["eos_token_id"] == [1, 106] == info["stop_token_ids"]  # <eos>, <end_of_turn>
    assert tokenizer.id_to_token(106) == "<end_of_turn>"
    assert info["add_bos_token"] is True and info["add_eos_token"] is False
    assert info["chat_template"] is None  # this file has none; callers fall back to default_chat_template
    assert hf_tokenizer.bos_token_id == info["bos_token_id"] and hf_tokenizer.eos_token_id == 1
    assert hf_tokenizer.add_bos_token == info["add_bos_token"]


@pytest.mark.slow
def test_gemma_config_matches_transformers(gemma_path: Path, hf_model: Any) -> None:
    ours = read_gguf_config(gemma_path)
    assert_config_matches(ours, hf_model.config)
    assert ours["model_type"] == "gemma3_text" and ours["architectures"] == ["Gemma3ForCausalLM"]
    assert (ours["hidden_size"], ours["num_hidden_layers"], ours["head_dim"]) == (640, 18, 256)
    assert (ours["num_attention_heads"], ours["num_key_value_heads"], ours["sliding_window"]) == (4, 1, 512)
    rope = hf_model.config.rope_parameters
    assert ours["rope_theta"] == rope["full_attention"]["rope_theta"] == 1_000_000.0
    assert ours["rope_local_base_freq"] == rope["sliding_attention"]["rope_theta"] == 10_000.0
    assert ours["query_pre_attn_scalar"] == hf_model.config.query_pre_attn_scalar == 256
    assert ours["layer_types"] == hf_model.config.layer_types
    assert ours["layer_types"].count("full_attention") == 3 and ours["layer_types"][5] == "full_attention"
    assert ours["tie_word_embeddings"] is True and ours["vocab_size"] == 262144


@pytest.mark.slow
def test_gemma_tensors_match_transformers(gemma_path: Path, hf_model: Any) -> None:
    expected = hf_model.state_dict()
    seen, kept = set(), {}
    for name, tensor in iter_gguf_tensors(gemma_path):
        assert tensor.dtype == torch.float32
        assert tensor.shape == expected[name].shape, name
        assert torch.equal(tensor, expected[name]), name
        seen.add(name)
        if name in ("model.norm.weight", "model.layers.3.self_attn.q_norm.weight"):
            kept[name] = tensor
    assert seen == set(expected) - {"lm_head.weight"} and len(seen) == 236  # tied: no output.weight in the file
    assert expected["model.layers.0.self_attn.k_proj.weight"].shape == (256, 640)  # GGUF lists [640, 256]
    # the file stores Gemma norms as w + 1 (F32); HF wants w
    stored = {t.name: t.data for t in gguf_reader.cached_reader(gemma_path).tensors if t.name.endswith("norm.weight")}
    np.testing.assert_allclose(kept["model.norm.weight"].numpy() + 1, stored["output_norm.weight"], rtol=1e-6)
    np.testing.assert_allclose(kept["model.layers.3.self_attn.q_norm.weight"].numpy() + 1,
                               stored["blk.3.attn_q_norm.weight"], rtol=1e-6)


@pytest.mark.slow
def test_convert_round_trip_logits(converted: Path, hf_model: Any, hf_tokenizer: Any) -> None:
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(converted, dtype=torch.float32).eval()
    ids = torch.tensor([hf_tokenizer("The capital of France is")["input_ids"]])
    with torch.no_grad():
        expected = hf_model(ids).logits
        actual = reloaded(ids).logits
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-5)
    assert_config_matches(json.loads((converted / "config.json").read_text()), hf_model.config)


@pytest.mark.slow
def test_convert_writes_hf_files(converted: Path) -> None:
    with safe_open(str(converted / "model.safetensors"), framework="pt") as weights:
        names = set(weights.keys())
        assert weights.get_tensor("model.embed_tokens.weight").dtype == torch.float32
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names and len(names) == 236
    tokenizer_config = json.loads((converted / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"] == GEMMA3_CHAT_TEMPLATE
    assert tokenizer_config["add_bos_token"] is True and tokenizer_config["bos_token"] == "<bos>"
    generation = json.loads((converted / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 106] and generation["bos_token_id"] == 2
    special = json.loads((converted / "special_tokens_map.json").read_text())
    assert special == {"bos_token": "<bos>", "eos_token": "<eos>", "unk_token": "<unk>", "pad_token": "<pad>"}


@pytest.mark.slow
def test_converted_tokenizer_matches_gguf_tokenizer(converted: Path, hf_tokenizer: Any,
                                                    gemma_tokenizer: tuple[Any, dict]) -> None:
    reloaded = transformers.AutoTokenizer.from_pretrained(converted)
    for text in TEXTS:
        assert reloaded(text)["input_ids"] == hf_tokenizer(text)["input_ids"], text
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    prompt = reloaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == "<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n"
    tokenizer, _ = gemma_tokenizer
    # the template writes <bos> itself, so the prompt is encoded without adding another
    assert tokenizer.encode(prompt, add_special_tokens=False).ids[:3] == [2, 105, 2364]


# ------------------------------------------------------------------------------------ small helpers & files


def test_gemma3_chat_template_renders_like_google() -> None:
    template = jinja2.Environment().from_string(default_chat_template("gemma3_text"))
    messages = [
        {"role": "system", "content": "Be helpful."},
        {"role": "user", "content": " Hello "},
        {"role": "assistant", "content": "Hi!"},
        {"role": "user", "content": [{"type": "text", "text": "Bye"}]},
    ]
    rendered = template.render(messages=messages, bos_token="<bos>", add_generation_prompt=True)
    assert rendered == (
        "<bos><start_of_turn>user\nBe helpful.\n\nHello<end_of_turn>\n"
        "<start_of_turn>model\nHi!<end_of_turn>\n"
        "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"
    )
    assert default_chat_template("llama") is None and default_chat_template("gemma3") == GEMMA3_CHAT_TEMPLATE


def test_cache_dir_follows_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path))
    assert default_model.cache_dir() == tmp_path
    monkeypatch.delenv(default_model.CACHE_ENV)
    assert default_model.cache_dir() == Path.home() / ".cache" / "tokenfab"


class _FakePackage:
    """Stands in for the PyPI package: 'assembles' a known payload and checks it like the real one."""

    MODEL_NAME = "model.gguf"
    PAYLOAD = b"GGUF-good"

    def __init__(self) -> None:
        self.builds = 0

    def assemble(self, output_path: Path | str, overwrite: bool = False) -> Path:
        target = Path(output_path)
        if target.exists() and not overwrite:
            if target.read_bytes() != self.PAYLOAD:
                raise FileExistsError(target)
            return target
        self.builds += 1
        target.write_bytes(self.PAYLOAD)
        return target


def test_default_model_path_assembles_once_and_repairs(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake = _FakePackage()
    monkeypatch.setattr(default_model, "packaged", fake)
    path = default_model.default_model_path(tmp_path)
    assert path == tmp_path / "models" / "model.gguf" and path.read_bytes() == fake.PAYLOAD
    assert default_model.default_model_path(tmp_path) == path and fake.builds == 1
    path.write_bytes(b"truncated")
    assert default_model.default_model_path(tmp_path).read_bytes() == fake.PAYLOAD and fake.builds == 2
    assert sorted(p.name for p in path.parent.iterdir()) == ["model.gguf"]  # no partial files left behind


def test_merges_from_vocab_orders_by_rank_then_length() -> None:
    vocab = {"a": 0, "b": 1, "ab": 2, "abb": 3, "bb": 4}
    ranks = {token: -index for token, index in vocab.items()}
    # both splits of "abb" share its rank; the longer left piece goes first
    assert merges_from_vocab(vocab, ranks) == [("a", "b"), ("ab", "b"), ("a", "bb"), ("b", "b")]


def test_bytes_to_unicode_is_gpt2_table() -> None:
    from transformers.convert_slow_tokenizer import bytes_to_unicode as reference

    assert bytes_to_unicode() == reference()


def test_merges_from_vocab_equals_transformers_generate_merges() -> None:
    from transformers.tokenization_utils_base import generate_merges

    rng = np.random.default_rng(1)
    pieces = {"".join(rng.choice(list("abcd"), size=rng.integers(1, 6))) for _ in range(300)}
    vocab = {token: index for index, token in enumerate(sorted(pieces, key=lambda t: (len(t), t)))}
    for ranks in ({t: -i for t, i in vocab.items()}, {t: float(rng.integers(-5, 0)) for t in vocab}):
        assert merges_from_vocab(vocab, ranks) == generate_merges(vocab, ranks)


@pytest.mark.parametrize(
    ("gguf_name", "arch", "hf_name"),
    [
        ("token_embd.weight", "llama", "model.embed_tokens.weight"),
        ("output.weight", "qwen2", "lm_head.weight"),
        ("blk.3.attn_q.bias", "qwen2", "model.layers.3.self_attn.q_proj.bias"),
        ("blk.0.ffn_norm.weight", "llama", "model.layers.0.post_attention_layernorm.weight"),
        ("blk.0.ffn_norm.weight", "gemma3", "model.layers.0.pre_feedforward_layernorm.weight"),
        ("blk.1.post_ffw_norm.weight", "gemma3", "model.layers.1.post_feedforward_layernorm.weight"),
        ("blk.2.attn_k_norm.weight", "qwen3", "model.layers.2.self_attn.k_norm.weight"),
    ],
)
def test_hf_tensor_name(gguf_name: str, arch: str, hf_name: str) -> None:
    assert hf_tensor_name(gguf_name, arch) == hf_name


def test_hf_tensor_name_rejects_unknown() -> None:
    with pytest.raises(ValueError, match="no HF counterpart"):
        hf_tensor_name("blk.0.post_ffw_norm.weight", "llama")


# ------------------------------------------------------------------------------------- synthetic GGUF files

HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 64, 2, 4, 2, 96


def llama_cpp_permute(weights: np.ndarray, heads: int, kv_heads: int | None = None) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute, the transform the loader must undo."""
    if kv_heads is not None and heads != kv_heads:
        heads = kv_heads
    return (weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def sentencepiece_vocab() -> tuple[list[str], list[float], list[int]]:
    pieces = ["▁", "h", "e", "l", "o", "w", "r", "d", "▁h", "▁w", "he", "ll", "lo", "llo", "▁he", "▁hello",
              "▁wo", "or", "▁wor", "ld", "▁world", "▁the", "t", "▁t", "th"]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces + ["<|im_start|>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(pieces) + [3]
    scores = [0.0, 0.0, 0.0] + [0.0] * 256 + [-float(i) for i in range(len(pieces))] + [0.0]
    return tokens, scores, types


def byte_level_vocab() -> tuple[list[str], list[str], list[int]]:
    alphabet = list(bytes_to_unicode().values())
    merges = ["Ġ h", "h e", "l l", "Ġh e", "ll o", "Ġhe llo", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld"]
    merged = ["".join(m.split(" ")) for m in merges]
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokens = alphabet + merged + specials
    types = [1] * (len(alphabet) + len(merged)) + [3] * len(specials)
    return tokens, merges, types


def hf_layout_weights(arch: str, vocab: int, head_dim: int, tied: bool) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {"model.embed_tokens.weight": (vocab, HIDDEN), "model.norm.weight": (HIDDEN,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, HIDDEN)
    for i in range(LAYERS):
        prefix = f"model.layers.{i}."
        shapes |= {
            prefix + "self_attn.q_proj.weight": (HEADS * head_dim, HIDDEN),
            prefix + "self_attn.k_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            prefix + "self_attn.v_proj.weight": (KV_HEADS * head_dim, HIDDEN),
            prefix + "self_attn.o_proj.weight": (HIDDEN, HEADS * head_dim),
            prefix + "mlp.gate_proj.weight": (FFN, HIDDEN),
            prefix + "mlp.up_proj.weight": (FFN, HIDDEN),
            prefix + "mlp.down_proj.weight": (HIDDEN, FFN),
            prefix + "input_layernorm.weight": (HIDDEN,),
            prefix + "post_attention_layernorm.weight": (HIDDEN,),
        }
        if arch == "qwen2":
            for proj, rows in (("q", HEADS), ("k", KV_HEADS), ("v", KV_HEADS)):
                shapes[prefix + f"self_attn.{proj}_proj.bias"] = (rows * head_dim,)
        if arch == "qwen3":
            shapes[prefix + "self_attn.q_norm.weight"] = (head_dim,)
            shapes[prefix + "self_attn.k_norm.weight"] = (head_dim,)
    return {name: rng.standard_normal(shape).astype(np.float32) * 0.1 for name, shape in shapes.items()}


GGUF_NAMES = {"embed_tokens": "token_embd", "norm": "output_norm", "lm_head": "output", "q_proj": "attn_q",
              "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate",
              "up_proj": "ffn_up", "down_proj": "ffn_down", "input_layernorm": "attn_norm",
              "post_attention_layernorm": "ffn_norm", "q_norm": "attn_q_norm", "k_norm": "attn_k_norm"}


def gguf_name(hf_name: str) -> str:
    parts = hf_name.removeprefix("model.").split(".")
    leaf, suffix = parts[-2], parts[-1]
    if parts[0] == "layers":
        return f"blk.{parts[1]}.{GGUF_NAMES[leaf]}.{suffix}"
    return f"{GGUF_NAMES[leaf]}.{suffix}"


def write_metadata(writer: gguf.GGUFWriter, arch: str, name: str, head_dim: int, *, hidden: int = HIDDEN,
                   layers: int = LAYERS, ffn: int = FFN, heads: int = HEADS, kv_heads: int = KV_HEADS,
                   rope_base: float = 500000.0) -> None:
    writer.add_name(name)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(rope_base)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    if arch == "qwen3":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def write_tokenizer(writer: gguf.GGUFWriter, arch: str) -> int:
    if arch == "llama":
        tokens, scores, types = sentencepiece_vocab()
        writer.add_tokenizer_model("llama")
        writer.add_token_scores(scores)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_unk_token_id(0)
    else:
        tokens, merges, types = byte_level_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("qwen2")
        writer.add_token_merges(merges)
        writer.add_bos_token_id(tokens.index("<|endoftext|>"))
        writer.add_eos_token_id(tokens.index("<|im_end|>"))
        writer.add_pad_token_id(tokens.index("<|endoftext|>"))
        writer.add_add_bos_token(False)
        writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    return len(tokens)


def write_synthetic_gguf(path: Path, arch: str, name: str, tied: bool) -> dict[str, np.ndarray]:
    """A tiny random model written the way llama.cpp writes one; returns its HF-layout weights."""
    head_dim = 128 if arch == "qwen3" else HIDDEN // HEADS  # transformers assumes 128 for qwen3
    writer = gguf.GGUFWriter(str(path), arch)
    write_metadata(writer, arch, name, head_dim)
    vocab = write_tokenizer(writer, arch)
    weights = hf_layout_weights(arch, vocab, head_dim, tied)
    for hf_name, values in weights.items():
        stored = values
        if arch == "llama" and ".q_proj." in hf_name:
            stored = llama_cpp_permute(values, HEADS, HEADS)
        elif arch == "llama" and ".k_proj." in hf_name:
            stored = llama_cpp_permute(values, HEADS, KV_HEADS)
        writer.add_tensor(gguf_name(hf_name), np.ascontiguousarray(stored))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


SYNTHETIC = [("llama", "tiny llama", False), ("llama", "mistral", False), ("qwen2", "tiny qwen2", True),
             ("qwen3", "tiny qwen3", True)]


@pytest.fixture(params=SYNTHETIC, ids=["llama", "mistral", "qwen2", "qwen3"])
def synthetic(request: pytest.FixtureRequest, tmp_path: Path) -> tuple[Path, str, dict[str, np.ndarray]]:
    arch, name, tied = request.param
    path = tmp_path / f"{arch}.gguf"
    return path, arch, write_synthetic_gguf(path, arch, name, tied)


def test_synthetic_tensors_round_trip(synthetic: tuple[Path, str, dict[str, np.ndarray]]) -> None:
    path, _, weights = synthetic
    ours = dict(iter_gguf_tensors(path))
    assert set(ours) == set(weights)
    for name, values in weights.items():
        np.testing.assert_array_equal(ours[name].numpy(), values, err_msg=name)


def test_synthetic_matches_transformers(synthetic: tuple[Path, str, dict[str, np.ndarray]]) -> None:
    path, arch, _ = synthetic
    ours = read_gguf_config(path)
    config = transformers.AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    assert_config_matches(ours, config)
    assert ours["model_type"] == config.model_type
    assert ours["tie_word_embeddings"] is (arch != "llama")
    if config.model_type == "mistral":
        return  # gguf-py has no "mistral" architecture, so transformers cannot load these weights
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    expected = model.state_dict()
    for name, tensor in iter_gguf_tensors(path):
        assert torch.equal(tensor, expected[name]), name


def test_synthetic_model_type_and_rope(synthetic: tuple[Path, str, dict[str, np.ndarray]]) -> None:
    path, arch, _ = synthetic
    ours = read_gguf_config(path)
    name = gguf.GGUFReader(path).get_field("general.name").contents()
    assert ours["model_type"] == ("mistral" if name == "mistral" else arch)
    assert ours["rope_theta"] == 500000.0 and ours["rope_parameters"]["rope_theta"] == 500000.0
    assert ours["head_dim"] == (128 if arch == "qwen3" else HIDDEN // HEADS)
    assert ours["num_key_value_heads"] == KV_HEADS and ours["rms_norm_eps"] == pytest.approx(1e-5)


SYNTHETIC_TEXTS = ["hello world", " hello  world", "the world", "hello\nworld", "héllo wörld 😀", "",
                   "<|im_start|>hello<|im_end|>", "hello<|endoftext|>", "xyz 123"]


@pytest.mark.parametrize(("arch", "name"), [("llama", "tiny llama"), ("qwen2", "tiny qwen2")])
def test_synthetic_tokenizer_matches_transformers(arch: str, name: str, tmp_path: Path) -> None:
    path = tmp_path / f"{arch}.gguf"
    write_synthetic_gguf(path, arch, name, tied=True)
    tokenizer, info = read_gguf_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    assert_encodes_like(tokenizer, theirs, SYNTHETIC_TEXTS)
    assert info["add_bos_token"] is (arch == "llama")
    assert info["bos_token_id"] == theirs.bos_token_id
    if arch == "qwen2":
        assert info["chat_template"] is not None and info["chat_template"] == theirs.chat_template
        assert info["eos_token"] == "<|im_end|>"


def test_convert_cli_bfloat16(tmp_path: Path) -> None:
    path = tmp_path / "llama.gguf"
    weights = write_synthetic_gguf(path, "llama", "tiny llama", tied=False)
    out = tmp_path / "hf"
    assert main([str(path), str(out), "--dtype", "bfloat16"]) == 0
    with safe_open(str(out / "model.safetensors"), framework="pt") as stored:
        assert set(stored.keys()) == set(weights)  # untied: lm_head written
        for name, values in weights.items():
            assert torch.equal(stored.get_tensor(name), torch.from_numpy(values).to(torch.bfloat16)), name
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["architectures"] == ["LlamaForCausalLM"]
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert tokenizer_config["chat_template"] is None
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.bfloat16
    reloaded = transformers.AutoTokenizer.from_pretrained(out)
    assert reloaded("hello world")["input_ids"][0] == 1


def test_convert_rejects_unknown_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="dtype"):
        convert_gguf_to_hf(tmp_path / "missing.gguf", tmp_path / "out", dtype="float16")
