"""Convert a GGUF file into an HF model directory that transformers and vLLM load as is.

Usage: python -m tokenfab.loader.convert IN.gguf OUT_DIR [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tokenfab.loader.chat_templates import default_chat_template
from tokenfab.loader.gguf_reader import iter_gguf_tensors, read_gguf_config
from tokenfab.loader.gguf_tokenizer import read_gguf_tokenizer

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

_GEMMA_MODEL_TYPES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})


def convert_gguf_to_hf(
    gguf_path: str | os.PathLike[str], out_dir: str | os.PathLike[str], dtype: str = "float32"
) -> Path:
    """Write config, weights, tokenizer and generation config of a GGUF file into out_dir; returns out_dir."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = read_gguf_config(gguf_path)
    _write_weights(gguf_path, out / "model.safetensors", DTYPES[dtype])
    _write_json(out / "config.json", {**config, "torch_dtype": dtype})
    write_tokenizer_files(gguf_path, out, config)
    return out


def write_tokenizer_files(gguf_path: str | os.PathLike[str], out: Path, config: dict[str, Any]) -> None:
    """tokenizer.json, tokenizer_config.json, special_tokens_map.json and generation_config.json of a GGUF."""
    tokenizer, info = read_gguf_tokenizer(gguf_path)
    tokenizer.save(str(out / "tokenizer.json"))
    _write_json(out / "tokenizer_config.json", tokenizer_config(config, info))
    _write_json(out / "special_tokens_map.json", special_tokens_map(info))
    _write_json(out / "generation_config.json", generation_config(info))


def _write_weights(gguf_path: str | os.PathLike[str], target: Path, dtype: torch.dtype) -> None:
    # A tied model's GGUF has no output.weight, so only embed_tokens is written, as HF checkpoints do.
    tensors = dict(iter_gguf_tensors(gguf_path, dtype=dtype))
    save_file(tensors, str(target), metadata={"format": "pt"})


def tokenizer_config(config: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    """tokenizer_config.json: class, special tokens, BOS/EOS policy and the chat template."""
    model_type = config["model_type"]
    gemma = model_type in _GEMMA_MODEL_TYPES
    return {
        # GemmaTokenizerFast rebuilds the same pipeline that tokenizer.json holds; anything else loads it as is.
        "tokenizer_class": "GemmaTokenizerFast" if gemma else "PreTrainedTokenizerFast",
        **special_tokens_map(info),
        "add_bos_token": info["add_bos_token"],
        "add_eos_token": info["add_eos_token"],
        "chat_template": info["chat_template"] or default_chat_template(model_type),
        "model_max_length": config["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
    }


def special_tokens_map(info: dict[str, Any]) -> dict[str, str]:
    """special_tokens_map.json: the named special tokens the GGUF states."""
    names = ("bos_token", "eos_token", "unk_token", "pad_token")
    return {name: info[name] for name in names if info.get(name) is not None}


def generation_config(info: dict[str, Any]) -> dict[str, Any]:
    """generation_config.json: token ids only; GGUF carries no sampling defaults."""
    generation = {"bos_token_id": info["bos_token_id"], "eos_token_id": info["eos_token_id"]}
    if info["pad_token_id"] is not None:
        generation["pad_token_id"] = info["pad_token_id"]
    return generation


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(prog="tokenfab convert", description="Convert a GGUF file to an HF directory.")
    parser.add_argument("gguf_path", type=Path, help="input .gguf file")
    parser.add_argument("out_dir", type=Path, help="output directory (created if missing)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weight dtype (default float32)")
    args = parser.parse_args(argv)
    if not args.gguf_path.is_file():
        parser.error(f"no such file: {args.gguf_path}")
    out = convert_gguf_to_hf(args.gguf_path, args.out_dir, dtype=args.dtype)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
