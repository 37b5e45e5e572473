"""`tokenfab quantize`: write a quantized HF checkpoint (layouts in tokenfab.quant.checkpoint) from a float model.

NVFP4 alone is written in NVIDIA ModelOpt's layout, so engines that load ModelOpt exports load it too; int4, int8,
fp8 and mixtures of formats are written in tokenfab's layout. Float tensors are written in `dtype`, and the
linear weights are quantized from their `dtype`-rounded values, as a quantizer starting from a bf16 checkpoint
would. A tied LM head is excluded by default (it is the embedding; ModelOpt excludes lm_head too).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from tokenfab.models.decoder import linear_layer_name
from tokenfab.models.loading import ModelSource, iter_weights, resolve_model
from tokenfab.quant.plan import QuantPlan, build_plan
from tokenfab.quant.registry import QUANTIZED_FORMATS
from tokenfab.version import __version__

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}
DEFAULT_EXCLUDE = ("lm_head",)
_TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def quantize_checkpoint(
    model: str | None,
    out_dir: str | os.PathLike[str],
    fmt: str,
    exclude: tuple[str, ...] | None = None,
    overrides: tuple[str, ...] = (),
    dtype: str = "bfloat16",
) -> Path:
    """Write `model` (HF directory, .gguf, or None for the default) quantized as `fmt` into out_dir."""
    if fmt not in QUANTIZED_FORMATS:
        raise ValueError(f"unknown quantized format {fmt!r} (choose from {', '.join(QUANTIZED_FORMATS)})")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    source = resolve_model(model)
    if source.quantization is not None:
        raise ValueError(f"{source.path} is already quantized ({source.quantization.format})")
    plan = build_plan(fmt, DEFAULT_EXCLUDE if exclude is None else exclude, overrides)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors, formats, ignored = _quantized_tensors(source, plan, DTYPES[dtype])
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config = {**source.hf_config, "torch_dtype": dtype}
    modelopt = set(formats.values()) <= {"nvfp4"}
    config["quantization_config"] = _modelopt_config(ignored) if modelopt else _tokenfab_config(fmt, formats, ignored)
    _write_json(out / "config.json", config)
    if modelopt:
        _write_json(
            out / "hf_quant_config.json",
            {
                "producer": {"name": "tokenfab", "version": __version__},
                "quantization": {
                    "quant_algo": "NVFP4",
                    "kv_cache_quant_algo": None,
                    "group_size": 16,
                    "exclude_modules": ignored,
                },
            },
        )
    _copy_tokenizer(source, out)
    return out


def _quantized_tensors(
    source: ModelSource, plan: QuantPlan, dtype: torch.dtype
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """(tensors to save, HF module -> format of each quantized projection, HF modules left in float)."""
    tensors: dict[str, torch.Tensor] = {}
    formats: dict[str, str] = {}
    ignored: list[str] = []
    tied = source.arch.tie_word_embeddings
    layer: str | None
    for name, tensor in iter_weights(source):
        tensor = tensor.to(dtype)
        if tied and name.endswith("embed_tokens.weight"):
            tensors[name] = tensor  # a lookup, never quantized; the tied head is saved apart only if quantized
            name, layer = "lm_head.weight", "lm_head"
        elif tied and name == "lm_head.weight":
            continue  # a tied head written out anyway: the embedding above stands for it
        else:
            layer = linear_layer_name(name)
        module = name.removesuffix(".weight")
        fmt = plan.format_for(layer) if layer is not None else "none"
        if fmt == "none":
            if layer is not None:
                ignored.append(module)
            if not (tied and layer == "lm_head"):
                tensors[name] = tensor
            continue
        weight = QUANTIZED_FORMATS[fmt].quantize(tensor)
        for key, value in weight.checkpoint_tensors().items():
            tensors[f"{module}.{key}"] = value.contiguous()
        formats[module] = fmt
    return tensors, formats, ignored


def _modelopt_config(ignored: list[str]) -> dict[str, Any]:
    """config.json's quantization_config as ModelOpt writes it (its convert_hf_quant_config_format)."""
    group = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": 16}
    return {
        "config_groups": {"group_0": {"input_activations": dict(group), "weights": dict(group), "targets": ["Linear"]}},
        "ignore": ignored,
        "quant_algo": "NVFP4",
        "group_size": 16,
        "producer": {"name": "tokenfab", "version": __version__},
        "quant_method": "modelopt",
    }


def _tokenfab_config(fmt: str, formats: dict[str, str], ignored: list[str]) -> dict[str, Any]:
    config: dict[str, Any] = {
        "quant_method": "tokenfab",
        "format": fmt,
        "version": 1,
        "layers": {m: f for m, f in formats.items() if f != fmt},
        "ignore": ignored,
    }
    if fmt == "int4" or "int4" in formats.values():
        from tokenfab.quant.int4 import GROUP_SIZE

        config["group_size"] = GROUP_SIZE
    return config


def _copy_tokenizer(source: ModelSource, out: Path) -> None:
    if source.is_gguf:
        from tokenfab.loader.convert import write_tokenizer_files

        write_tokenizer_files(source.path, out, source.hf_config)
        return
    for name in _TOKENIZER_FILES:
        if (source.path / name).exists():
            shutil.copy2(source.path / name, out / name)


def _write_json(path: Path, payload: dict[str, Any]) -> None:
    path.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
