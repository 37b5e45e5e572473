"""N-gram (prompt lookup) proposer: continue the sequence the way it continued after the last earlier occurrence
of its own suffix.

Agentic, RAG and code-editing traffic copies long spans of its context, and then the tokens after an earlier
occurrence of the last few tokens are good guesses. Suffix lengths are tried from ngram_max down to ngram_min;
the most recent earlier occurrence wins, since nearby context predicts best. Each request keeps an index from
every n-gram of its history to the position after its latest occurrence, extended as tokens arrive, so a
lookup costs a few dictionary probes per step whatever the context length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenfab.engine.speculative.proposer import Proposal, Proposer, StepView
from tokenfab.engine.types import Request


@dataclass(slots=True)
class _History:
    tokens: list[int] = field(default_factory=list)
    num_output: int = 0
    """Output tokens of the request already appended to `tokens`."""
    index: dict[tuple[int, ...], int] = field(default_factory=dict)
    """n-gram -> position right after its latest occurrence that has a continuation."""


class NgramProposer(Proposer):
    name = "ngram"
    cheap = True

    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        self.ngram_min = ngram_min
        self.ngram_max = ngram_max
        self._histories: dict[str, _History] = {}

    def rounds(self, k: int) -> int:
        return 1 if k else 0

    def forget(self, request_id: str) -> None:
        self._histories.pop(request_id, None)

    def propose(self, step: StepView | None, requests: list[Request], budgets: list[int]) -> list[Proposal]:
        return [Proposal(self.lookup(r, k)) if k else Proposal() for r, k in zip(requests, budgets)]

    def lookup(self, request: Request, k: int) -> list[int]:
        history = self._sync(request)
        tokens = history.tokens
        end = len(tokens)
        for n in range(min(self.ngram_max, end - 1), self.ngram_min - 1, -1):
            at = history.index.get(tuple(tokens[end - n :]))
            if at is not None:
                # Past the end of the history the continuation repeats itself (a period of end - at tokens).
                draft: list[int] = []
                for i in range(k):
                    draft.append(tokens[at + i] if at + i < end else draft[at + i - end])
                return draft
        return []

    def _sync(self, request: Request) -> _History:
        history = self._histories.get(request.request_id)
        if history is None:
            history = self._histories[request.request_id] = _History()
            self._extend(history, request.prompt_token_ids)
        new = request.output_token_ids[history.num_output :]
        history.num_output += len(new)
        self._extend(history, new)
        return history

    def _extend(self, history: _History, new: list[int]) -> None:
        tokens, index = history.tokens, history.index
        for token in new:
            p = len(tokens)
            # The n-grams ending just before p now have a continuation (the token at p).
            for n in range(self.ngram_min, min(self.ngram_max, p) + 1):
                index[tuple(tokens[p - n : p])] = p
            tokens.append(token)
