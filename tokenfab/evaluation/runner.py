"""`tokenfab eval`: perplexity, KL divergence vs a reference and greedy agreement of weight formats.

The reference is the model with its weights rounded to bf16 ("the bf16 model"), computed in fp32: this CPU has
no fast bf16 matmul, and bf16-rounded weights in fp32 arithmetic give the bf16 model's logits up to activation
rounding. Every variant is quantized from those same bf16-rounded weights and computed in fp32, so differences
come from the weight format alone (`--reference float32` keeps the checkpoint's values instead: the measure for the
gguf format, which runs a GGUF file's own blocks and is compared with that file dequantized). All models score the
same windows in lockstep, so the reference's full-vocabulary distributions are never stored.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tokenfab.evaluation.corpus import corpus_text
from tokenfab.evaluation.scoring import ModelScorer, Scorer, Tally, score_window
from tokenfab.models.decoder import DecoderModel
from tokenfab.models.loading import ModelSource, load_model, load_tokenizer, quantize_model, resolve_model
from tokenfab.quant.plan import QuantPlan, build_plan, parse_override
from tokenfab.tokenizer import token_windows

_SPEC = re.compile(r"^(?P<fmt>[a-z0-9][a-z0-9-]*)(/(?P<method>[a-z]+))?(\[(?P<rules>[^\]]*)\])?$")


@dataclass(frozen=True, slots=True)
class Variant:
    name: str
    plan: QuantPlan


def parse_variant(spec: str) -> Variant:
    """`int4` (the format with its serving defaults), `int4[]` (every linear layer int4), or
    `int4[lm_head=int8,layers.0.*=none]` (only the rules given); `int4/gptq...` picks the gptq method."""
    m = _SPEC.match(spec.strip())
    if not m:
        raise ValueError(f"bad variant {spec!r}: use FORMAT[/METHOD], FORMAT[] or FORMAT[GLOB=FORMAT,...]")
    method = m.group("method") or "rtn"
    if m.group("rules") is None:
        return Variant(spec, build_plan(m.group("fmt"), method=method))
    rules = tuple(r for r in m.group("rules").split(",") if r)
    for rule in rules:
        parse_override(rule)
    return Variant(spec, build_plan(m.group("fmt"), (), rules, method))


def load_variant(
    source: ModelSource, plan: QuantPlan, max_positions: int, reference_dtype: torch.dtype = torch.bfloat16
) -> DecoderModel:
    """The model in fp32 with weights rounded to `reference_dtype`, then stored per `plan`; a plan using the gguf
    format loads the file's own blocks (`source` must be the .gguf) and leaves its weights unrounded."""
    if plan.uses("gguf"):
        return load_model(source, torch.float32, torch.device("cpu"), max_positions, weight_format=plan)
    model = load_model(source, torch.float32, torch.device("cpu"), max_positions, weight_format=None)
    with torch.no_grad():
        for p in model.parameters():  # tied parameters are visited once
            p.copy_(p.to(reference_dtype).float())
    quantize_model(model, source, plan)
    return model


def _share_embedding(model: DecoderModel, reference: DecoderModel) -> DecoderModel:
    """Point the variant's (never quantized, identical) embedding at the reference's: 670 MB less per variant
    for Gemma 3 270M, which keeps all models of a run in memory at once."""
    if not isinstance(model.embed_tokens, nn.Embedding):
        return model  # a packed table (gguf) is not the reference's
    assert isinstance(reference.embed_tokens, nn.Embedding)
    shared = reference.embed_tokens.weight
    if torch.equal(model.embed_tokens.weight, shared):
        model.embed_tokens.weight = shared
        if model.arch.tie_word_embeddings and model.lm_head.weight is not None:
            model.lm_head.weight = shared  # type: ignore[assignment]  # a Parameter, typed as the Tensor it holds
    return model


def evaluate(
    model: str | None,
    variants: list[Variant],
    window: int = 512,
    max_tokens: int | None = None,
    corpus: Path | None = None,
    progress=print,
    others: dict[str, Scorer] | None = None,
    reference_dtype: torch.dtype = torch.bfloat16,
) -> dict:
    """`others`: further scorers (e.g. another engine on the same tokens), reported after the variants.
    reference_dtype: what the reference's weights are rounded to (float32: not at all)."""
    torch.manual_seed(0)
    source = resolve_model(model)
    tokenizer = load_tokenizer(source)
    chunks = token_windows(tokenizer, corpus_text(corpus), window, max_tokens)
    reference = load_variant(source, QuantPlan("none"), window, reference_dtype)
    gguf = resolve_model(model, prefer_gguf=True) if any(v.plan.uses("gguf") for v in variants) else None
    models = {
        v.name: _share_embedding(
            load_variant(gguf if gguf is not None and v.plan.uses("gguf") else source, v.plan, window, reference_dtype),
            reference,
        )
        for v in variants
    }
    scorers: dict[str, Scorer] = {name: ModelScorer(m) for name, m in models.items()}
    scorers.update(others or {})
    tallies = {name: Tally() for name in ["reference", *scorers]}
    start = time.perf_counter()
    for i, ids in enumerate(chunks):
        score_window(ModelScorer(reference), scorers, ids, tallies)
        progress(f"window {i + 1}/{len(chunks)}: {len(ids)} tokens, {time.perf_counter() - start:.0f} s")
    ref = tallies["reference"].summary()
    reference_name = {torch.bfloat16: "bf16", torch.float32: "fp32"}.get(reference_dtype, str(reference_dtype))
    rows = [
        {
            "variant": f"{reference_name} (reference)",
            "plan": "none",
            **ref,
            "ppl_delta_pct": 0.0,
            "weight_bytes": reference.weight_bytes_per_token(),
        }
    ]
    for v in variants:
        s = tallies[v.name].summary()
        rows.append(
            {
                "variant": v.name,
                "plan": v.plan.label,
                **s,
                "ppl_delta_pct": 100 * (s["perplexity"] / ref["perplexity"] - 1),
                "weight_bytes": models[v.name].weight_bytes_per_token(),
            }
        )
    for name in others or {}:
        s = tallies[name].summary()
        rows.append(
            {
                "variant": name,
                "plan": "external",
                **s,
                "ppl_delta_pct": 100 * (s["perplexity"] / ref["perplexity"] - 1),
                "weight_bytes": None,
            }
        )
    return {
        "model": str(source.path),
        "corpus": str(corpus) if corpus else "tokenfab/evaluation/data/corpus.txt",
        "window": window,
        "windows": len(chunks),
        "scored_tokens": ref["tokens"],
        "reference": (
            f"weights rounded to {reference_name}, computed in fp32"
            if reference_name != "fp32"
            else "the checkpoint's fp32 weights, computed in fp32"
        ),
        "seconds": time.perf_counter() - start,
        "rows": rows,
    }


def markdown(result: dict) -> str:
    lines = [
        f"# Weight formats: accuracy on {Path(result['model']).name}",
        "",
        f"Corpus: {result['corpus']} ({result['scored_tokens']} scored tokens in {result['windows']} windows of "
        f"<= {result['window']}). Reference: {result['reference']}. KL = KL(reference || variant) of the "
        "next-token distribution over the full vocabulary; agreement = same argmax as the reference.",
        "",
        "| variant | plan | weight MB/token | perplexity | Δ ppl | KL mean | KL p99 | greedy agreement |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        size = "-" if r["weight_bytes"] is None else f"{r['weight_bytes'] / 1e6:.1f}"
        lines.append(
            f"| {r['variant']} | {r['plan']} | {size} | {r['perplexity']:.3f} | "
            f"{r['ppl_delta_pct']:+.2f} % | {r['kl_mean']:.4f} | {r['kl_p99']:.4f} | "
            f"{100 * r['greedy_agreement']:.1f} % |"
        )
    return "\n".join(lines) + "\n"
