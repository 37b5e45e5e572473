"""Command-line flags derived from the config dataclasses, so `serve`, `generate` and `LLM()` cannot drift.

Every field of `EngineConfig` (and of its nested `PricingConfig`) becomes a flag: its name in kebab case unless
the field's metadata names another (`flag`), its type from the annotation, its default from the dataclass, its
choices from the metadata, and its help from the field's docstring. `SpeculativeConfig` keeps its command-line
form (`--speculative ngram|mtp|draft:MODEL` plus its tuning flags), parsed by `SpeculativeConfig.parse`.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import inspect
import textwrap
from functools import cache
from typing import Any, cast

from tokenfab.config import EngineConfig, PricingConfig, SpeculativeConfig

_SPEC_FLAGS = {
    "num_speculative_tokens": "--num-speculative-tokens",
    "ngram_min": "--spec-ngram-min",
    "ngram_max": "--spec-ngram-max",
    "adaptive": "--spec-adaptive",
}


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (the one-line doc STYLE asks of every field)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = cast(ast.ClassDef, tree.body[0]).body
    docs: dict[str, str] = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_fields(p: argparse.ArgumentParser, cls: type, skip: set[str]) -> None:
    docs = field_docs(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or dataclasses.is_dataclass(f.default):
            continue
        kind = str(f.type)
        options: dict[str, Any] = {
            "dest": f"{cls.__name__}.{f.name}",
            "default": f.default,
            "help": docs.get(f.name, ""),
        }
        if "choices" in f.metadata:
            options["choices"] = list(f.metadata["choices"]())
        if kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif kind.startswith("tuple["):
            options.update(action="append", default=None, metavar=f.metadata.get("metavar", "VALUE"))
            options["help"] += " (repeatable)"
        else:
            options["type"] = f.metadata.get("type") or (
                int if kind.startswith("int") else float if kind.startswith("float") else str
            )
            if "choices" not in options:
                options["metavar"] = f.metadata.get("metavar", f.name.upper())
        p.add_argument(_flag(f), **options)


def add_engine_args(p: argparse.ArgumentParser) -> None:
    """Every EngineConfig field as a flag (pricing's included; speculative in its command-line form)."""
    add_fields(p, EngineConfig, set())
    add_fields(p, PricingConfig, set())
    docs = field_docs(SpeculativeConfig)
    p.add_argument(
        "--speculative",
        default="none",
        metavar="none|ngram|mtp|draft:MODEL",
        help="speculative decoding: n-gram prompt lookup, the checkpoint's MTP modules, or a draft model "
        "with the same tokenizer (HF directory or .gguf)",
    )
    defaults = SpeculativeConfig()
    for name, flag in _SPEC_FLAGS.items():
        value = getattr(defaults, name)
        options: dict[str, Any] = {"dest": f"SpeculativeConfig.{name}", "default": value, "help": docs.get(name, "")}
        if isinstance(value, bool):
            options["action"] = argparse.BooleanOptionalAction
        else:
            options.update(type=type(value), metavar=name.upper())
        p.add_argument(flag, **options)


def field_values(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The values the flags of `cls`'s fields were given (append flags as tuples)."""
    values = vars(args)
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        key = f"{cls.__name__}.{f.name}"
        if key not in values:
            continue
        value, kind = values[key], str(f.type)
        if kind.startswith("tuple["):
            value = tuple(value) if value is not None else (None if "None" in kind else ())
        out[f.name] = value
    return out


def engine_config(args: argparse.Namespace, **overrides: Any) -> EngineConfig:
    """The EngineConfig the flags describe."""
    spec = field_values(args, SpeculativeConfig)
    options = field_values(args, EngineConfig)
    options["pricing"] = PricingConfig(**field_values(args, PricingConfig))
    options["speculative"] = SpeculativeConfig.parse(args.speculative, **spec)
    options.update(overrides)
    return EngineConfig(**options)
