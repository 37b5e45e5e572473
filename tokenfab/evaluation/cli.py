"""`tokenfab eval` arguments and output files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_VARIANTS = "fp8,int8,int4,nvfp4"


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity, KL vs the bf16 model and greedy agreement per weight format")
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded Gemma 3 270M)")
    p.add_argument(
        "--formats",
        default=DEFAULT_VARIANTS,
        help="variants separated by commas: FORMAT (serving defaults), FORMAT[] (every "
        "linear layer) or FORMAT[GLOB=FORMAT,...] (default: %(default)s)",
    )
    p.add_argument("--window", type=int, default=512, help="tokens per scored window")
    p.add_argument("--max-tokens", type=int, default=None, help="score only the first N corpus tokens")
    p.add_argument("--corpus", type=Path, default=None, help="UTF-8 text file (default: the shipped corpus)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument(
        "--reference",
        default="bfloat16",
        choices=["bfloat16", "float32"],
        help="what the reference model's weights are rounded to (float32: the checkpoint's own values, "
        "e.g. to measure the gguf format against the GGUF dequantized)",
    )
    p.add_argument("--out", type=Path, default=Path("results/eval"), help="writes OUT/eval.json and OUT/eval.md")
    p.set_defaults(func=main)


def split_variants(text: str) -> list[str]:
    """Variants separated by ';' or whitespace, or by ',' outside brackets."""
    out, depth, current = [], 0, ""
    for ch in text:
        depth += ch == "["
        depth -= ch == "]"
        if ch in ";, \t" and depth == 0:
            if current:
                out.append(current)
            current = ""
        else:
            current += ch
    if current:
        out.append(current)
    return out


def main(args: argparse.Namespace) -> int:
    import torch

    from tokenfab.evaluation.runner import evaluate, markdown, parse_variant

    if args.threads:
        torch.set_num_threads(args.threads)
    variants = [parse_variant(s) for s in split_variants(args.formats)]
    result = evaluate(
        args.model,
        variants,
        args.window,
        args.max_tokens,
        args.corpus,
        progress=lambda m: print(m, file=sys.stderr, flush=True),
        reference_dtype=getattr(torch, args.reference),
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "eval.json").write_text(json.dumps(result, indent=1))
    (args.out / "eval.md").write_text(markdown(result))
    print(markdown(result))
    return 0
