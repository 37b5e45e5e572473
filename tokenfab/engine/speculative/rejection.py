"""Lossless verification of draft tokens against the target model's distribution.

Greedy requests accept drafts while they equal the target's argmax. Sampled requests use rejection sampling
(Leviathan et al. 2023): draft x, drawn from q, is accepted with probability min(1, p(x) / q(x)); on rejection
the token is drawn from norm(max(0, p - q)); when every draft is accepted a bonus token is drawn from p at the
next position. Every emitted token is then distributed exactly as p.

Deterministic proposers (n-gram lookup, greedy draft models, MTP heads) have a one-hot q. Then min(1, p/q)
is p(x) and the residual is p without x, and both are realized by one exponential race: the position's token
is argmax(p / E) with E ~ Exp(1), the draft is accepted when that token is x, and otherwise that token is the
residual draw. This is the same noise, in the same order, that the sampler uses without speculation, so a
seeded request gives the same tokens with or without drafts.
"""

from __future__ import annotations

import torch


def accept_greedy(targets: list[int], drafts: list[int]) -> int:
    """How many leading drafts equal the target's argmax at their position."""
    accepted = 0
    while accepted < len(drafts) and drafts[accepted] == targets[accepted]:
        accepted += 1
    return accepted


def race(weights: torch.Tensor, candidates: torch.Tensor | None, generator: torch.Generator) -> int:
    """Draw an index with probability proportional to weights (no need to normalize); map through candidates."""
    noise = torch.empty_like(weights).exponential_(generator=generator)
    choice = int((weights / noise).argmax())
    return int(candidates[choice]) if candidates is not None else choice


def verify_draft(
    probs: torch.Tensor, candidates: torch.Tensor | None, draft: int, q: torch.Tensor | None, generator: torch.Generator
) -> tuple[int, bool]:
    """One draft position: (the token to emit here, whether it is the draft).

    probs: target probabilities over `candidates` (token ids; None means the whole vocabulary), after
    temperature, top-k, top-p and min-p. q: the draft distribution over the whole vocabulary, or None for a
    deterministic draft.
    """
    if q is None:
        token = race(probs, candidates, generator)
        return token, token == draft
    p_full = _scatter(probs, candidates, q.numel())
    q = q.to(p_full.dtype)
    u = float(torch.rand((), generator=generator))
    if u * float(q[draft]) < float(p_full[draft]):
        return draft, True
    residual = (p_full - q).clamp_(min=0.0)
    if float(residual.sum()) <= 0.0:
        residual = p_full  # p <= q everywhere means p == q, where rejection has probability 0
    return race(residual, None, generator), False


def _scatter(probs: torch.Tensor, candidates: torch.Tensor | None, vocab: int) -> torch.Tensor:
    if candidates is None:
        return probs
    full = torch.zeros(vocab, dtype=probs.dtype)
    full[candidates] = probs
    return full
