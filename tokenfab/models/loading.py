"""Resolve a model reference (HF directory, .gguf file, or the embedded default) into weights, arch and tokenizer."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from tokenfab.models.arch import ArchConfig, arch_from_hf_config
from tokenfab.models.decoder import DecoderModel, linear_layer_name
from tokenfab.quant.base import LinearWeight
from tokenfab.quant.checkpoint import CheckpointQuantization, QuantizedTensorSplitter, detect_quantization
from tokenfab.quant.gguf_source import GGUFPackedSplitter
from tokenfab.quant.plan import QuantPlan
from tokenfab.tokenizer import Tokenizer, load_gguf_tokenizer, load_hf_tokenizer


@dataclass(frozen=True)
class ModelSource:
    path: Path
    hf_config: dict[str, Any]
    arch: ArchConfig
    quantization: CheckpointQuantization | None = None
    """How a pre-quantized checkpoint stores its linear layers (None: float weights)."""

    @property
    def is_gguf(self) -> bool:
        return self.path.suffix == ".gguf"


def resolve_model(model: str | None, prefer_gguf: bool = False) -> ModelSource:
    """prefer_gguf: for the embedded default, its GGUF file rather than the fp32 HF copy (for the gguf format)."""
    if model is None:
        from tokenfab.loader.default_model import default_model_dir, default_model_path

        path = default_model_path() if prefer_gguf else default_model_dir()
    else:
        path = Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model not found: {path} (pass an HF directory or a .gguf file)")
    if path.suffix == ".gguf":
        from tokenfab.loader.gguf_reader import read_gguf_config

        cfg = read_gguf_config(path)
    else:
        cfg = json.loads((path / "config.json").read_text())
    return ModelSource(path, cfg, arch_from_hf_config(cfg), detect_quantization(path, cfg))


def iter_weights(source: ModelSource) -> Iterator[tuple[str, torch.Tensor]]:
    if source.is_gguf:
        from tokenfab.loader.gguf_reader import iter_gguf_tensors

        yield from iter_gguf_tensors(source.path)
        return
    files = sorted(source.path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors files in {source.path}")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def expert_files(source: ModelSource) -> dict[tuple[int, int], list[tuple[Path, str]]]:
    """Where each routed expert's tensors are: (layer, expert) -> [(safetensors file, tensor name)] (Qwen3-MoE's,
    DeepSeek-V3's or Mixtral's names)."""
    out: dict[tuple[int, int], list[tuple[Path, str]]] = {}
    for file in sorted(source.path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                parts = name.split(".")
                if len(parts) == 8 and parts[0] == "model" and parts[4] == "experts" and parts[3] in _MOE_BLOCKS:
                    out.setdefault((int(parts[2]), int(parts[5])), []).append((file, name))
    return out


_MOE_BLOCKS = ("mlp", "block_sparse_moe")


def expert_tensors(
    files: dict[tuple[int, int], list[tuple[Path, str]]], layer: int, expert: int
) -> list[tuple[str, torch.Tensor]]:
    """The HF-named tensors of one routed expert of a MoE layer, read from the files `expert_files` found."""
    where = files.get((layer, expert))
    if not where:
        raise ValueError(f"the checkpoint has no tensors for expert {expert} of layer {layer}")
    out = []
    for file, name in where:
        with safe_open(str(file), framework="pt") as f:
            out.append((name, f.get_tensor(name)))
    return out


def load_tokenizer(source: ModelSource) -> Tokenizer:
    if source.is_gguf:
        return load_gguf_tokenizer(source.path, source.arch.model_type)
    return load_hf_tokenizer(source.path)


def load_model(
    source: ModelSource,
    dtype: torch.dtype,
    device: torch.device,
    max_positions: int,
    weight_format: str | QuantPlan | None = "none",
    experts_held: Callable[[int], Sequence[int]] | None = None,
) -> DecoderModel:
    """weight_format: a tokenfab.quant format (or a per-layer plan) for the linear layers, or None to keep plain
    torch weights. Layers a quantized checkpoint stores keep the checkpoint's format either way. experts_held:
    with expert parallelism, the routed experts this rank loads per MoE layer (None: all)."""
    with torch.device("meta"):
        model = DecoderModel(source.arch, max_positions, experts_held)
    model = model.to_empty(device=device)
    if source.arch.tie_word_embeddings:
        # Materializing from meta creates new parameters, which unties them.
        assert isinstance(model.embed_tokens, nn.Embedding)
        model.lm_head.weight = model.embed_tokens.weight  # type: ignore[assignment]  # the Parameter itself
    with torch.device(device):
        model.build_rope(max_positions)
    plan = QuantPlan(weight_format) if isinstance(weight_format, str) else weight_format
    stored: Callable[[], Mapping[str, LinearWeight]] | None
    if plan is not None and plan.uses("gguf"):
        if device.type != "cpu":
            raise ValueError(f"the gguf format runs on CPU (its kernels are C++/AVX2), not {device}")
        packed = gguf_packed_splitter(source, plan)
        weights, stored = packed.plain(), packed.built
    else:
        weights, stored = iter_weights(source), None
    if source.quantization is not None:
        splitter = QuantizedTensorSplitter(source.quantization, device)
        weights, stored = splitter.plain(weights), splitter.built
    model.load_weights(weights, stored)
    model = model.to(dtype)
    if weight_format is not None:
        quantize_model(model, source, weight_format)
    return model.eval()


def gguf_packed_splitter(source: ModelSource, plan: QuantPlan) -> GGUFPackedSplitter:
    """The file's tensors with the layers `plan` gives the gguf format kept packed (and the embedding table with
    them, see tokenfab.quant.plan)."""
    if not source.is_gguf:
        raise ValueError(
            f"quantization 'gguf' keeps a GGUF file's own quantized blocks, but {source.path} is not a "
            ".gguf file (pass --model FILE.gguf, or leave --model out for the default model's GGUF)"
        )
    tied = source.arch.tie_word_embeddings
    packed_embedding = plan.format_for("lm_head") == "gguf" if tied else plan.default == "gguf"

    def group_of(hf_name: str) -> str | None:
        if hf_name.endswith("embed_tokens.weight"):
            return "embed_tokens" if packed_embedding else None
        layer = linear_layer_name(hf_name)
        return layer if layer is not None and plan.format_for(layer) == "gguf" else None

    return GGUFPackedSplitter(source.path, group_of)


def quantize_model(model: DecoderModel, source: ModelSource, plan: str | QuantPlan) -> None:
    """prepare_weights, after calibrating on the shipped calibration text when the plan's method needs it."""
    hessians = None
    if isinstance(plan, QuantPlan) and plan.method == "gptq":
        from tokenfab.models.calibration import calibration_windows, collect_hessians

        hessians = collect_hessians(model, calibration_windows(load_tokenizer(source)))
    model.prepare_weights(plan, hessians)
