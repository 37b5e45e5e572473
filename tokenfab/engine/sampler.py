"""Sampler: logits of the requests that sample this step -> one token each (+ logprobs when asked).

Order of processing per row: penalties (repetition, presence, frequency), min_tokens suppression of stop ids,
then greedy argmax, or temperature -> top-k -> top-p -> min-p -> draw. Logprobs are of the raw model distribution
(before penalties and temperature), as OpenAI reports them. A request with a seed draws its noise from its own
generator, so its tokens do not depend on what else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tokenfab.engine.types import Request, SamplingParams, TokenLogprobs

_NUCLEUS_PROBE = 512
"""Top-p first looks for the nucleus among this many tokens; a full sort only when it is wider."""


@dataclass(slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[TokenLogprobs | None]


class Sampler:
    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        self._request_generators: dict[str, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        self._request_generators.pop(request_id, None)

    def __call__(self, logits: torch.Tensor, requests: list[Request]) -> SampleResult:
        logits = logits.float()
        raw = logits
        if any(r.params.needs_penalties or r.num_output_tokens < r.params.min_tokens for r in requests):
            logits = logits.clone()
            for row, request in enumerate(requests):
                _apply_penalties(logits[row], request)
                _suppress_early_stop(logits[row], request)
        greedy = [i for i, r in enumerate(requests) if r.params.greedy]
        if len(greedy) == len(requests):
            tokens = logits.argmax(dim=-1)
        else:
            tokens = torch.empty(len(requests), dtype=torch.long)
            if greedy:
                rows = torch.tensor(greedy)
                tokens[rows] = logits.index_select(0, rows).argmax(dim=-1)
        for row, request in enumerate(requests):
            if not request.params.greedy:
                tokens[row] = self._draw(logits[row], request)
        token_list = tokens.tolist()
        return SampleResult(token_list, _logprobs(raw, requests, token_list))

    def _draw(self, logits: torch.Tensor, request: Request) -> int:
        p = request.params
        scores = logits / p.temperature
        candidates: torch.Tensor | None = None
        if p.top_k and p.top_k < scores.numel():
            scores, candidates = scores.topk(p.top_k)
        if p.top_p < 1.0:
            scores, candidates = _top_p(scores, candidates, p.top_p)
        probs = torch.softmax(scores, dim=-1)
        if p.min_p > 0.0:
            probs = torch.where(probs >= p.min_p * probs.max(), probs, torch.zeros_like(probs))
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p and needs one noise vector per step.
        noise = torch.empty_like(probs).exponential_(generator=self._generator(request))
        choice = int((probs / noise).argmax())
        return int(candidates[choice]) if candidates is not None else choice

    def _generator(self, request: Request) -> torch.Generator:
        if request.params.seed is None:
            return self.generator
        gen = self._request_generators.get(request.request_id)
        if gen is None:
            gen = torch.Generator().manual_seed(request.params.seed)
            self._request_generators[request.request_id] = gen
        return gen


def _top_p(scores: torch.Tensor, candidates: torch.Tensor | None, top_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest set of highest-probability tokens whose mass reaches top_p (exact)."""
    probs = torch.softmax(scores, dim=-1)
    k = min(_NUCLEUS_PROBE, probs.numel())
    top, idx = probs.topk(k)
    if top.sum() < top_p and k < probs.numel():
        top, idx = probs.sort(descending=True)
    cumulative = top.cumsum(0)
    keep = int((cumulative - top < top_p).sum().clamp(min=1))
    idx = idx[:keep]
    base = candidates[idx] if candidates is not None else idx
    return scores[idx], base


def _apply_penalties(row: torch.Tensor, request: Request) -> None:
    p: SamplingParams = request.params
    if not p.needs_penalties:
        return
    out = torch.tensor(request.output_token_ids, dtype=torch.long)
    if p.repetition_penalty != 1.0:
        seen = torch.tensor(request.all_token_ids, dtype=torch.long).unique()
        vals = row[seen]
        row[seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
    if out.numel() and (p.presence_penalty or p.frequency_penalty):
        ids, counts = out.unique(return_counts=True)
        row[ids] -= p.frequency_penalty * counts.to(row.dtype) + p.presence_penalty


def _suppress_early_stop(row: torch.Tensor, request: Request) -> None:
    if request.num_output_tokens >= request.params.min_tokens:
        return
    stop_ids = set(request.params.stop_token_ids)
    if not request.params.ignore_eos:
        stop_ids.update(request.eos_token_ids)
    if stop_ids:
        row[list(stop_ids)] = float("-inf")


def _logprobs(raw: torch.Tensor, requests: list[Request], tokens: list[int]) -> list[TokenLogprobs | None]:
    wanted = [i for i, r in enumerate(requests) if r.params.logprobs is not None]
    out: list[TokenLogprobs | None] = [None] * len(requests)
    if not wanted:
        return out
    logprobs = torch.log_softmax(raw[wanted], dim=-1)
    for row, i in enumerate(wanted):
        token = tokens[i]
        chosen = float(logprobs[row, token])
        rank = int((logprobs[row] > chosen).sum()) + 1
        k = requests[i].params.logprobs or 0
        top: list[tuple[int, float]] = []
        if k:
            values, ids = logprobs[row].topk(k)
            top = list(zip(ids.tolist(), values.tolist()))
        out[i] = TokenLogprobs(token, chosen, rank, top)
    return out
