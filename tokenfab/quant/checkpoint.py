"""Quantized HF checkpoints: recognising their quantization config and reading their per-projection tensors.

Two layouts, both one safetensors entry per tensor under the HF module name (`model.layers.0.self_attn.q_proj`),
projections unfused:

* **ModelOpt NVFP4** (what NVIDIA TensorRT Model Optimizer exports and vLLM / TensorRT-LLM / SGLang load):
  config.json `quantization_config = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
  "ignore": [...]}` and/or hf_quant_config.json `{"producer": {"name": "modelopt"}, "quantization":
  {"quant_algo": "NVFP4", "group_size": 16, "exclude_modules": [...]}}`; per quantized projection `weight` uint8
  [N, K/2], `weight_scale` float8_e4m3fn [N, K/16], `weight_scale_2` float32 scalar, `input_scale` float32 scalar.
* **tokenfab** (int4, int8, fp8, and nvfp4 mixed with other formats): `quantization_config = {"quant_method":
  "tokenfab", "format": "int4", "group_size": 32, "layers": {"lm_head": "int8"}, "ignore": [...]}`; per quantized
  projection `weight` (int4: uint8 [N, K/2] two's-complement nibbles, even column low; int8: int8 [N, K]; fp8:
  float8_e4m3fn [N, K]) and `weight_scale` (int4: float16 [N, K/group_size]; int8, fp8: float32 [N]), i.e. the
  runtime tensors of tokenfab.quant's formats. `layers` gives modules whose format differs from `format`.

Layers listed in `ignore` / `exclude_modules` are stored as plain float `weight` tensors.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tokenfab.quant.base import QuantizedWeight
from tokenfab.quant.registry import QUANTIZED_FORMATS

MODELOPT_ALGOS = ("NVFP4", "W4A16_NVFP4")
"""ModelOpt quant_algo values whose weights are NVFP4 (the second is the weight-only export)."""
SCALE_KEYS = frozenset({"weight_scale", "weight_scale_2", "input_scale"})
QUANTIZED_DTYPES = frozenset({torch.uint8, torch.int8, torch.float8_e4m3fn})


@dataclass(frozen=True)
class CheckpointQuantization:
    """How a checkpoint's linear layers are stored."""

    layout: str
    """'modelopt' or 'tokenfab'."""
    format: str
    """The tokenfab format of quantized layers (per-layer exceptions in `layers`)."""
    config: dict[str, Any]
    """The quantization config (group_size, ...)."""
    layers: dict[str, str] = field(default_factory=dict)
    """HF module name -> format, where it differs from `format`."""

    def format_of(self, module: str) -> str:
        return self.layers.get(module, self.format)

    def build(self, module: str, tensors: dict[str, torch.Tensor]) -> QuantizedWeight:
        return QUANTIZED_FORMATS[self.format_of(module)].from_checkpoint_tensors(tensors, self.config)


def detect_quantization(path: Path, hf_config: dict[str, Any]) -> CheckpointQuantization | None:
    """The checkpoint's quantization, from config.json's quantization_config or ModelOpt's hf_quant_config.json;
    None for a float checkpoint. Unsupported schemes are an error, not silently loaded as floats."""
    config = hf_config.get("quantization_config")
    legacy = path / "hf_quant_config.json" if path.is_dir() else None
    if config is None and legacy is not None and legacy.exists():
        config = json.loads(legacy.read_text())
    if config is None:
        return None
    method = str(config.get("quant_method", "")).lower()
    if method.startswith("modelopt") or "quantization" in config:  # the second: hf_quant_config.json
        return _modelopt(config)
    if method == "tokenfab":
        return _tokenfab(config)
    raise ValueError(f"unsupported quantization_config quant_method {method!r} (supported: modelopt NVFP4, tokenfab)")


def _modelopt(config: dict[str, Any]) -> CheckpointQuantization:
    inner = config.get("quantization", config)
    algo = str(inner.get("quant_algo", "")).upper()
    if algo not in MODELOPT_ALGOS:
        raise ValueError(f"unsupported ModelOpt quant_algo {algo!r} (supported: {', '.join(MODELOPT_ALGOS)})")
    group = int(inner.get("group_size") or 16)
    ignore = inner.get("exclude_modules", inner.get("ignore", [])) or []
    return CheckpointQuantization("modelopt", "nvfp4", {"group_size": group, "ignore": list(ignore)})


def _tokenfab(config: dict[str, Any]) -> CheckpointQuantization:
    formats = [config.get("format"), *config.get("layers", {}).values()]
    unknown = [f for f in formats if f not in QUANTIZED_FORMATS]
    if unknown:
        raise ValueError(
            f"unknown tokenfab checkpoint format {unknown[0]!r} (choose from {', '.join(QUANTIZED_FORMATS)})"
        )
    return CheckpointQuantization("tokenfab", config["format"], config, dict(config.get("layers", {})))


class QuantizedTensorSplitter:
    """Separates a checkpoint's stream of tensors: float tensors pass through, the tensors of quantized
    projections are kept (by HF module name) to be built into formats once the stream is exhausted."""

    def __init__(self, quantization: CheckpointQuantization, device: torch.device | str = "cpu") -> None:
        self.quantization = quantization
        self.device = torch.device(device)
        self._modules: dict[str, dict[str, torch.Tensor]] = {}

    def plain(self, weights: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in weights:
            module, _, key = name.rpartition(".")
            if key in SCALE_KEYS or (key == "weight" and tensor.dtype in QUANTIZED_DTYPES):
                self._modules.setdefault(module, {})[key] = tensor.to(self.device)
            else:
                yield name, tensor

    def built(self) -> dict[str, QuantizedWeight]:
        """HF module name -> its weight in the checkpoint's format (call after `plain` is exhausted)."""
        out = {}
        for module, tensors in self._modules.items():
            if "weight" not in tensors:
                raise ValueError(f"checkpoint has scales but no quantized weight for {module!r}")
            out[module] = self.quantization.build(module, tensors)
        return out
