"""Adaptive speculation: how many draft tokens each request gets in the next step (k = 0 switches it off).

The policy, in full:

1. Acceptance. Each request keeps an exponentially weighted estimate of alpha, the probability that a draft
   token is accepted given the ones before it were (accepted drafts / drafts tried, where the trial that failed
   counts once). A new request starts from the engine-wide estimate. With k drafts a request is expected to emit
   E(k) = 1 + alpha + alpha^2 + ... + alpha^k tokens instead of 1.
2. Cost. A step's seconds are modelled as c0 + c_tok * tokens + c_row * logit_rows + c_seq * multi-token
   sequences, fitted online (ridge regression toward a prior from the model's size, recent steps weighted
   most). A draft token costs c_tok + c_row, and the first draft of a request also c_seq (it stops riding in
   the batched decode path); the proposer's own time is measured per pass and charged per pass it needs.
3. Choice. The ks maximize expected emitted tokens per second of the next step: Dinkelbach's iteration
   (lambda = tokens / seconds; each request takes the k maximizing E(k) - lambda * cost(k); repeat), once for
   each cap on the proposer's passes. So speculation stays on while a draft token's expected yield beats what
   the same time buys in the batch: at batch 1 (a step is mostly weight reads) even modest acceptance pays; in
   a large batch (a step is mostly per-token compute) only near-certain drafts do, and low acceptance switches
   it off at any batch size.
4. Re-probing. A request held at k = 0 for `probe_interval` steps gets one draft token, if one draft would pay
   at a high acceptance, so an estimate made during a bad stretch can recover.

With `adaptive` off every request gets the most drafts allowed (num_speculative_tokens, less near its end).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

FEATURES = ("step", "tokens", "logit_rows", "multi_token_seqs")


@dataclass(slots=True)
class StepShape:
    """What a step computes: the cost model's features."""

    tokens: int
    logit_rows: int
    multi_token_seqs: int

    def vector(self) -> np.ndarray:
        return np.array([1.0, self.tokens, self.logit_rows, self.multi_token_seqs])


class CostModel:
    """Online ridge regression of step seconds on StepShape, pulled toward a prior, forgetting old steps."""

    def __init__(
        self, prior: tuple[float, float, float, float], prior_weight: float = 1.0, decay: float = 0.98
    ) -> None:
        self.prior = np.asarray(prior, dtype=float)
        typical = np.array([1.0, 32.0, 8.0, 2.0])
        self._reg = prior_weight * np.diag(typical**2)
        self._a = np.zeros((4, 4))
        self._b = np.zeros(4)
        self.decay = decay
        self.coef = self.prior.copy()

    def observe(self, shape: StepShape, seconds: float) -> None:
        x = shape.vector()
        self._a = self.decay * self._a + np.outer(x, x)
        self._b = self.decay * self._b + x * seconds
        coef = np.linalg.solve(self._a + self._reg, self._b + self._reg @ self.prior)
        self.coef = np.maximum(coef, 0.0)

    def seconds(self, shape: StepShape) -> float:
        return float(self.coef @ shape.vector())


@dataclass(slots=True)
class Candidate:
    """A request that will decode next step."""

    request_id: str
    cap: int
    """Most drafts it can use (num_speculative_tokens, fewer near max_tokens or the context limit)."""


@dataclass(slots=True)
class _Acceptance:
    accepted: float = 0.0
    trials: float = 0.0
    steps_off: int = 0


@dataclass(slots=True)
class PolicyConfig:
    max_k: int
    adaptive: bool = True
    ema: float = 0.8
    """Weight kept by a request's acceptance estimate per verified step."""
    prior_trials: float = 1.0
    """How many trials the engine-wide estimate counts for in a request's estimate."""
    probe_interval: int = 32
    probe_alpha: float = 0.9
    initial_alpha: float = 0.5


@dataclass(slots=True)
class Choice:
    ks: list[int]
    expected_tokens: float
    seconds: float
    probes: int = 0
    rates: dict[int, float] = field(default_factory=dict)
    """Expected tokens per second for each cap on proposer passes that was tried."""


class AdaptivePolicy:
    def __init__(self, config: PolicyConfig, cost: CostModel) -> None:
        self.config = config
        self.cost = cost
        self._requests: dict[str, _Acceptance] = {}
        self._global = _Acceptance(config.initial_alpha * 4.0, 4.0)

    # -- acceptance ----------------------------------------------------------------------------------------------

    def alpha(self, request_id: str) -> float:
        g = self._global
        prior = g.accepted / g.trials if g.trials else self.config.initial_alpha
        state = self._requests.get(request_id)
        if state is None:
            return prior
        w = self.config.prior_trials
        return (state.accepted + w * prior) / (state.trials + w)

    def record(self, request_id: str, proposed: int, accepted: int) -> None:
        """A verified step: `proposed` drafts, the first `accepted` of them accepted."""
        if proposed <= 0:
            return
        trials = accepted + (1 if accepted < proposed else 0)
        state = self._requests.setdefault(request_id, _Acceptance())
        e = self.config.ema
        state.accepted = e * state.accepted + accepted
        state.trials = e * state.trials + trials
        g = self._global
        g.accepted = 0.99 * g.accepted + accepted
        g.trials = 0.99 * g.trials + trials

    def forget(self, request_id: str) -> None:
        self._requests.pop(request_id, None)

    # -- choice --------------------------------------------------------------------------------------------------

    def choose(
        self, candidates: list[Candidate], base: StepShape, pass_seconds: float, rounds: Callable[[int], int]
    ) -> Choice:
        """ks for the next step. base: the next step without drafts; pass_seconds: measured time of one
        proposer pass; rounds(K): passes the proposer needs for K drafts."""
        if not self.config.adaptive:
            ks = [min(self.config.max_k, c.cap) for c in candidates]
            return Choice(ks, 0.0, 0.0)
        alphas = [self.alpha(c.request_id) for c in candidates]
        best, best_rate = None, -1.0
        rates: dict[int, float] = {}
        top = self.config.max_k
        # Only caps where the proposer's pass count steps up matter (n-gram lookup: 0 and the largest).
        for cap in [c for c in range(top + 1) if c == top or rounds(c) != rounds(c + 1)]:
            choice = self._dinkelbach(candidates, alphas, base, cap, pass_seconds * rounds(cap))
            rates[cap] = choice.expected_tokens / choice.seconds if choice.seconds > 0 else 0.0
            if rates[cap] > best_rate * (1 + 1e-9):
                best, best_rate = choice, rates[cap]
        assert best is not None
        best.rates = rates
        self._probe(best, candidates, base)
        return best

    def _dinkelbach(
        self, candidates: list[Candidate], alphas: list[float], base: StepShape, cap: int, draft_seconds: float
    ) -> Choice:
        c0, c_tok, c_row, c_seq = self.cost.coef
        per_draft = c_tok + c_row
        base_tokens = float(max(base.logit_rows, 1))
        base_seconds = self.cost.seconds(base)
        ks = [0] * len(candidates)
        rate = base_tokens / base_seconds if base_seconds > 0 else 0.0
        for _ in range(20):
            new = [_best_k(a, min(cap, c.cap), rate, per_draft, c_seq) for a, c in zip(alphas, candidates)]
            tokens = base_tokens + sum(_expected(a, k) for a, k in zip(alphas, new))
            seconds = base_seconds + sum(k * per_draft + (c_seq if k else 0.0) for k in new)
            seconds += draft_seconds if any(new) else 0.0
            new_rate = tokens / seconds if seconds > 0 else 0.0
            done = new == ks
            ks, rate = new, new_rate
            if done:
                break
        tokens = base_tokens + sum(_expected(a, k) for a, k in zip(alphas, ks))
        seconds = base_seconds + sum(k * per_draft + (c_seq if k else 0.0) for k in ks)
        seconds += draft_seconds if any(ks) else 0.0
        return Choice(ks, tokens, seconds)

    def _probe(self, choice: Choice, candidates: list[Candidate], base: StepShape) -> None:
        _, c_tok, c_row, c_seq = self.cost.coef
        rate = choice.expected_tokens / choice.seconds if choice.seconds > 0 else 0.0
        worth = self.config.probe_alpha > rate * (c_tok + c_row + c_seq)
        for i, c in enumerate(candidates):
            state = self._requests.setdefault(c.request_id, _Acceptance())
            if choice.ks[i]:
                state.steps_off = 0
                continue
            state.steps_off += 1
            if worth and c.cap and state.steps_off >= self.config.probe_interval:
                choice.ks[i] = 1
                choice.probes += 1
                state.steps_off = 0


def _expected(alpha: float, k: int) -> float:
    """Extra tokens expected from k drafts: alpha + alpha^2 + ... + alpha^k."""
    return sum(alpha**j for j in range(1, k + 1))


def _best_k(alpha: float, cap: int, rate: float, per_draft: float, per_seq: float) -> int:
    """argmax over k in 0..cap of expected extra tokens - rate * extra seconds."""
    best_k, best_value, gain = 0, 0.0, 0.0
    for k in range(1, cap + 1):
        gain += alpha**k
        value = gain - rate * (k * per_draft + per_seq)
        if value > best_value:
            best_k, best_value = k, value
    return best_k
