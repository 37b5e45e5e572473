"""The proposer interface: after a step, guess up to k tokens that continue each decoding request.

Proposals are verified by the target model in the next step, so a proposer can only cost time, never change
what is generated. Implementations: n-gram prompt lookup (`ngram`), a smaller draft model (`draft`), and the
checkpoint's multi-token-prediction modules (`mtp`); `build_proposer` picks one by name.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from tokenfab.engine.types import Request, StepPlan

if TYPE_CHECKING:
    from tokenfab.engine.model_runner import RunOutput


@dataclass(slots=True)
class Proposal:
    token_ids: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None
    """[len(token_ids), vocab]: the distributions the drafts were sampled from; None for deterministic drafts."""


@dataclass(slots=True)
class StepView:
    """The step that just ran, for proposers that read the target's hidden states (MTP)."""

    plan: StepPlan
    run: RunOutput


class Proposer(abc.ABC):
    name: str = ""
    max_proposal: int = 1 << 30
    """Most drafts it can make per request and step (MTP: its number of modules)."""
    cheap: bool = False
    """Proposing costs next to nothing (a lookup): propose first, so the policy only weighs real drafts."""

    @abc.abstractmethod
    def propose(self, step: StepView, requests: list[Request], budgets: list[int]) -> list[Proposal]:
        """Up to budgets[i] tokens continuing requests[i] (each has just sampled and runs on); fewer, or none,
        when the proposer has no good guess. Called once after every step that sampled."""

    @abc.abstractmethod
    def rounds(self, k: int) -> int:
        """Sequential proposer passes needed for k tokens (the policy charges measured time per pass)."""

    def forget(self, request_id: str) -> None:  # noqa: B027 - optional: stateless proposers keep nothing
        """Drop what is kept for a request that finished, was aborted or was preempted."""
