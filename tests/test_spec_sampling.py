"""Sampling with speculation follows the target distribution.

The check is a chi-square goodness-of-fit test of observed token counts against the exact target distribution,
at a significance of about 1e-6 (Wilson-Hilferty quantile, cells with expected count < 5 pooled), so a correct
sampler fails it about once in a million runs; every test also shows that a biased verifier — one that accepts
every draft — fails the same check.
"""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch

import tokenfab.engine.sampler as sampler_module
from conftest import random_prompts
from tiny_models import write_tiny_model
from tokenfab import LLM, SamplingParams
from tokenfab.config import SpeculativeConfig
from tokenfab.engine.speculative.rejection import verify_draft

Z = 4.75
"""Standard normal quantile of the test's significance (one-sided, ~1e-6)."""


def chi_square(counts: Counter, probs: dict, n: int) -> tuple[float, float]:
    """(statistic, rejection threshold); cells with expected count < 5 are pooled, as are unexpected outcomes."""
    stat, pooled_obs, pooled_exp, cells = 0.0, 0, 0.0, 0
    for key, p in probs.items():
        expected = n * p
        if expected < 5:
            pooled_obs, pooled_exp = pooled_obs + counts.get(key, 0), pooled_exp + expected
            continue
        stat += (counts.get(key, 0) - expected) ** 2 / expected
        cells += 1
    pooled_obs += sum(c for key, c in counts.items() if key not in probs)
    if pooled_exp > 0 or pooled_obs:
        stat += (pooled_obs - pooled_exp) ** 2 / max(pooled_exp, 1e-9)
        cells += 1
    df = max(cells - 1, 1)
    threshold = df * (1 - 2 / (9 * df) + Z * math.sqrt(2 / (9 * df))) ** 3
    return stat, threshold


P = torch.tensor([0.35, 0.25, 0.15, 0.1, 0.1, 0.05])
Q = torch.tensor([0.05, 0.1, 0.1, 0.15, 0.25, 0.35])


def draws(q: torch.Tensor | None, n: int, verifier=verify_draft) -> Counter:
    """Tokens emitted at one position: a draft from q (or always token 4, a deterministic draft) is verified
    against P."""
    g = torch.Generator().manual_seed(0)
    counts: Counter = Counter()
    for _ in range(n):
        draft = int(torch.multinomial(q, 1, generator=g)) if q is not None else 4
        token, _ = verifier(P.clone(), None, draft, q, g)
        counts[token] += 1
    return counts


@pytest.mark.parametrize("q", [Q, None], ids=["sampled-draft", "deterministic-draft"])
def test_rejection_sampling_emits_the_target_distribution(q):
    n = 20000
    target = {i: float(p) for i, p in enumerate(P)}
    stat, threshold = chi_square(draws(q, n), target, n)
    assert stat < threshold, (stat, threshold)

    def accept_always(probs, candidates, draft, q, generator):
        return draft, True

    stat, threshold = chi_square(draws(q, n, accept_always), target, n)
    assert stat > 10 * threshold


def test_top_k_candidates_and_residual():
    """Target restricted to candidate ids; the draft distribution puts mass outside them."""
    g = torch.Generator().manual_seed(1)
    candidates = torch.tensor([7, 3, 9])
    probs = torch.tensor([0.5, 0.3, 0.2])
    q = torch.full((12,), 1 / 12)
    counts: Counter = Counter()
    n = 12000
    for _ in range(n):
        draft = int(torch.multinomial(q, 1, generator=g))
        counts[verify_draft(probs, candidates, draft, q, g)[0]] += 1
    stat, threshold = chi_square(counts, {7: 0.5, 3: 0.3, 9: 0.2}, n)
    assert stat < threshold and set(counts) == {3, 7, 9}


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampling")
    return write_tiny_model("llama", root / "target"), write_tiny_model("llama", root / "draft", seed=1)


TOP_K = 6


def exact_continuations(path, prompt: list[int]) -> dict[tuple[int, int], float]:
    """P(second and third generated tokens) at temperature 1 with top-k, summed over the first, from transformers
    on the same weights. (The first token is sampled at the prompt, before any draft exists; the second and
    third are where drafts are verified: both drafted, or drafted then the bonus token.)"""
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def tops(contexts: list[list[int]]) -> list[dict[int, float]]:
        with torch.no_grad():
            logits = model(torch.tensor(contexts)).logits[:, -1]
        values, ids = logits.topk(TOP_K)
        return [dict(zip(i.tolist(), torch.softmax(v, -1).tolist())) for v, i in zip(values, ids)]

    first = tops([prompt])[0]
    seconds = tops([prompt + [a] for a in first])
    pairs = [(a, b, pa * pb) for (a, pa), nxt in zip(first.items(), seconds) for b, pb in nxt.items()]
    thirds = tops([prompt + [a, b] for a, b, _ in pairs])
    out: dict[tuple[int, int], float] = {}
    for (a, b, pab), nxt in zip(pairs, thirds):
        for c, pc in nxt.items():
            out[(b, c)] = out.get((b, c), 0.0) + pab * pc
    return out


def sample_continuations(path, speculative, prompt, n: int) -> Counter:
    llm = LLM(str(path), speculative=speculative, dtype="float32", kv_cache_memory_gb=0.05, max_model_len=256,
              max_num_batched_tokens=512, max_num_seqs=128, num_threads=1, seed=3)
    # Four tokens: after the first, two drafts (for the second and third) and a bonus (cut off at max_tokens).
    params = SamplingParams(max_tokens=4, temperature=1.0, top_k=TOP_K, ignore_eos=True)
    outs = llm.generate([prompt] * n, params)
    stats = llm.engine.core.stats()
    assert stats.spec.proposed_tokens > n // 2
    llm.engine.core.kv.check_integrity()
    return Counter(tuple(o.outputs[0].token_ids[1:3]) for o in outs)


@pytest.mark.parametrize("method", ["draft-self", "draft-other", "ngram"])
def test_sampled_tokens_with_speculation_follow_the_target(method, paths, monkeypatch):
    """Unseeded requests at temperature 1. The draft model samples its drafts (a real q: the draft-self run
    accepts most, the draft-other run rejects most and draws from the residual); lookup drafts are one-hot."""
    target, draft = paths
    prompt = random_prompts([9], seed=31)[0]
    if method == "ngram":
        spec = SpeculativeConfig("ngram", None, 2, ngram_min=1, ngram_max=2, adaptive=False)
        prompt = prompt * 3
    else:
        spec = SpeculativeConfig("draft", str(target if method == "draft-self" else draft), 2, adaptive=False)
    n = 2500
    exact = exact_continuations(target, prompt)
    stat, threshold = chi_square(sample_continuations(target, spec, prompt, n), exact, n)
    assert stat < threshold, (method, stat, threshold)
    if method == "draft-other":
        # The same check catches a verifier that takes every draft.
        monkeypatch.setattr(sampler_module, "verify_draft", lambda probs, cands, draft, q, gen: (draft, True))
        stat, threshold = chi_square(sample_continuations(target, spec, prompt, n), exact, n)
        assert stat > 10 * threshold
