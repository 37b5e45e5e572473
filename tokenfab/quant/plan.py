"""QuantPlan: which weight format each linear layer of a model gets (`--quantization` plus per-layer rules).

Layers are named as the engine names them: `lm_head`, `layers.<i>.self_attn.qkv_proj` (q, k and v fused),
`layers.<i>.self_attn.o_proj`, `layers.<i>.mlp.gate_up_proj` (gate and up fused), `layers.<i>.mlp.down_proj`.
Rules are shell-style globs (fnmatch); the first that matches a layer decides its format, `none` keeping it in
the model's dtype. The token embedding is a lookup, not a linear layer, and is never quantized at load; with `gguf`
(a GGUF file's own blocks, kept packed) it stays packed as the file stores it when the (tied) LM head is gguf, or
(untied) when gguf is the default.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

from tokenfab.quant.registry import WEIGHT_FORMATS

METHODS = ("rtn", "gptq")

DEFAULT_RULES: dict[str, tuple[tuple[str, str], ...]] = {
    # Gemma 3 270M (tokenfab eval, benchmarks/reports/quantization): the tied LM head is half the weight bytes;
    # in int8 it costs ~nothing (int8 everywhere: +0.5 % perplexity), in 4 bits alone +8.8 % on the first window.
    "int4": (("lm_head", "int8"),),
    "nvfp4": (("lm_head", "int8"),),
}
"""Rules a format gets unless `--quantization-exclude` / overrides are given."""


@dataclass(frozen=True, slots=True)
class QuantPlan:
    default: str = "none"
    """Format of every layer no rule matches."""
    rules: tuple[tuple[str, str], ...] = ()
    """(layer-name glob, format), first match wins."""
    method: str = "rtn"
    """How codes are chosen: `rtn` (round to nearest, the formats' own quantize) or `gptq` (error-compensated
    over calibration text; int4 and nvfp4 layers, others stay rtn)."""

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"unknown quantization method {self.method!r} (choose from {', '.join(METHODS)})")
        for fmt in (self.default, *(f for _, f in self.rules)):
            if fmt not in WEIGHT_FORMATS:
                raise ValueError(f"unknown weight format {fmt!r} (choose from {', '.join(WEIGHT_FORMATS)})")

    def uses(self, fmt: str) -> bool:
        """Whether any layer may get `fmt`."""
        return self.default == fmt or any(f == fmt for _, f in self.rules)

    def format_for(self, layer: str) -> str:
        for pattern, fmt in self.rules:
            if fnmatchcase(layer, pattern):
                return fmt
        return self.default

    @property
    def label(self) -> str:
        """Short description, e.g. `int4/gptq (lm_head: int8)`."""
        name = self.default if self.method == "rtn" else f"{self.default}/{self.method}"
        if not self.rules:
            return name
        return f"{name} ({', '.join(f'{p}: {f}' for p, f in self.rules)})"


def parse_override(text: str) -> tuple[str, str]:
    """`PATTERN=FORMAT` -> (pattern, format)."""
    pattern, sep, fmt = text.rpartition("=")
    if not sep or not pattern or not fmt:
        raise ValueError(f"quantization override {text!r} is not PATTERN=FORMAT (e.g. lm_head=int8)")
    return pattern, fmt


def build_plan(
    quantization: str, exclude: tuple[str, ...] | None = None, overrides: tuple[str, ...] = (), method: str = "rtn"
) -> QuantPlan:
    """Overrides first, then exclusions (kept as `none`); exclude=None takes the format's measured defaults."""
    rules = [parse_override(o) for o in overrides]
    if exclude is None:
        rules += DEFAULT_RULES.get(quantization, ())
    else:
        rules += [(pattern, "none") for pattern in exclude]
    return QuantPlan(quantization, tuple(rules), method)
