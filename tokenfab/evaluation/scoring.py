"""Score token sequences with a model outside the engine: one prefill per window over a KV cache of its own,
log-probabilities of every next token, compared with a reference model's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import torch

from tokenfab.models.decoder import DecoderModel
from tokenfab.models.sequence import sequence_hidden

LOGIT_ROWS = 128
"""Positions whose full-vocabulary log-probs exist at once (128 x 262k fp32 = 134 MB for Gemma)."""


def window_hidden(model: DecoderModel, ids: list[int]) -> torch.Tensor:
    """Final hidden states [T, hidden] of one sequence, prefilled at once from position 0."""
    return sequence_hidden(model, ids)


@dataclass(slots=True)
class Tally:
    """Running sums over scored positions."""

    tokens: int = 0
    nll: float = 0.0
    kl: float = 0.0
    agree: int = 0
    kl_values: list[float] = field(default_factory=list)

    def summary(self) -> dict:
        kl = torch.tensor(self.kl_values or [0.0], dtype=torch.float64)
        return {
            "tokens": self.tokens,
            "nll": self.nll / max(1, self.tokens),
            "perplexity": float(torch.tensor(self.nll / max(1, self.tokens)).exp()),
            "kl_mean": self.kl / max(1, self.tokens),
            "kl_p99": float(kl.quantile(0.99)),
            "kl_max": float(kl.max()),
            "greedy_agreement": self.agree / max(1, self.tokens),
        }


class Scorer(Protocol):
    """Something that prefills a window and yields next-token log-probabilities for a range of its positions."""

    def prepare(self, ids: list[int]) -> None: ...

    def logprobs(self, rows: slice) -> torch.Tensor:
        """[rows, vocab] fp32 log-softmax of the predictions made at positions `rows` of the prepared window."""


class ModelScorer:
    """A tokenfab DecoderModel (any weight formats)."""

    def __init__(self, model: DecoderModel) -> None:
        self.model = model
        self._hidden: torch.Tensor | None = None

    def prepare(self, ids: list[int]) -> None:
        self._hidden = window_hidden(self.model, ids)

    @torch.inference_mode()
    def logprobs(self, rows: slice) -> torch.Tensor:
        assert self._hidden is not None, "prepare() first"
        return torch.log_softmax(self.model.compute_logits(self._hidden[rows]), dim=-1)


@torch.inference_mode()
def score_window(reference: Scorer, scorers: dict[str, Scorer], ids: list[int], tallies: dict[str, Tally]) -> None:
    """Add one window's next-token statistics to each scorer's tally; `tallies` also holds the reference's under
    "reference". KL is KL(reference || scorer) over the full vocabulary, summed in float64."""
    everyone = {"reference": reference, **scorers}
    for scorer in everyone.values():
        scorer.prepare(ids)
    targets = torch.tensor(ids[1:])
    for start in range(0, len(ids) - 1, LOGIT_ROWS):
        rows = slice(start, min(start + LOGIT_ROWS, len(ids) - 1))
        ref_lp = reference.logprobs(rows)
        ref_top = ref_lp.argmax(dim=-1)
        ref_p = ref_lp.exp()
        for name, scorer in everyone.items():
            lp = ref_lp if name == "reference" else scorer.logprobs(rows)
            tally = tallies[name]
            target = targets[rows].to(lp.device)
            tally.nll -= float(lp.gather(1, target[:, None]).double().sum())
            kl = (ref_p * (ref_lp - lp)).sum(dim=-1).double().clamp_(min=0)
            tally.kl += float(kl.sum())
            tally.kl_values.extend(kl.tolist())
            tally.agree += int((lp.argmax(dim=-1) == ref_top).sum())
            tally.tokens += int(target.numel())
