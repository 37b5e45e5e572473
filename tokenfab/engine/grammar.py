"""Structured output: requests that generate under a grammar (JSON schema, regex, Lark), through llguidance.

Each such request has a matcher that follows its emitted tokens. Before a step's forward pass, `prepare` starts
computing the allowed-token bitmasks of the step's constrained requests on a background thread (llguidance's
executor, without the GIL), so they are ready when the logits are: one row for the next token and one after each
draft token, computed by advancing the matcher over the drafts and rolling it back. `mask` then adds 0 / -inf to
those logit rows (a byte -> 8 floats table, one add over the rows), so whatever the sampler draws parses, and a
draft the grammar forbids is rejected by verification like any other (the target distribution at each position
is the masked one, so acceptance keeps the distribution). After sampling, the emitted tokens advance the matcher.
Once the grammar is complete only EOS is allowed, and EOS ends the request. The state is the emitted tokens'
prefix, so it survives preemption (which recomputes KV, not tokens). The tokenizer table llguidance needs is
built on the first grammar request (about a second for a 262k vocabulary).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from tokenfab.engine.types import Request, SampleResult, ScheduledRequest

log = logging.getLogger("tokenfab.engine")
BIAS = torch.where(((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool(), 0.0, float("-inf"))
"""[256, 8]: a bitmask byte -> the additive logit bias of its 8 tokens (bit set: allowed, 0; else -inf)."""


def grammar_error(grammar: str) -> str | None:
    """Why llguidance cannot use `grammar` (None when it can): the front end refuses such a request."""
    import llguidance

    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    return (messages[0] if messages else "invalid grammar") if is_error else None


class Grammars:
    def __init__(self, tokenizer_json: Callable[[], str], vocab_size: int, eos_token_ids: list[int]) -> None:
        self._tokenizer_json = tokenizer_json
        self._vocab_size = vocab_size
        self._eos = eos_token_ids
        self._tokenizer = None
        self._unusable: str | None = None
        """Why llguidance cannot read this model's tokenizer, once it has failed to."""
        self._matchers: dict[str, object] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._executor: object = None
        self._pending: Future[torch.Tensor] | None = None
        self._rows: dict[str, int] = {}
        """Request id -> its first row in the pending bitmask."""

    def add(self, request: Request) -> None:
        """Start the request's matcher; ValueError for a grammar llguidance refuses."""
        grammar = request.params.grammar
        if grammar is None:
            return
        import llguidance

        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the grammar cannot be used: {matcher.get_error()}")
        if request.output_token_ids and not matcher.consume_tokens(request.output_token_ids):
            raise ValueError(f"the tokens generated so far do not follow the grammar: {matcher.get_error()}")
        self._matchers[request.request_id] = matcher

    def prepare(self, scheduled: list[ScheduledRequest]) -> None:
        """Start computing the bitmasks of this step's constrained rows (the next token, and after each draft)."""
        entries, rows = [], 0
        self._rows = {}
        for s in scheduled:
            matcher = self._matchers.get(s.request.request_id)
            if matcher is not None and s.samples:
                entries.append((matcher, rows, list(s.spec_token_ids)))
                self._rows[s.request.request_id] = rows
                rows += s.num_logit_rows
        if not entries:
            self._pending = None
            return
        if self._pool is None:
            import llguidance

            self._pool, self._executor = ThreadPoolExecutor(1, "grammar"), llguidance.LLExecutor()
        words = (self._vocab_size + 31) // 32
        bitmask = torch.full((rows, words), -1, dtype=torch.int32)  # rows past a refused draft: unconstrained
        self._pending = self._pool.submit(self._fill, entries, bitmask)

    def _fill(self, entries: list, bitmask: torch.Tensor) -> torch.Tensor:
        ptr, size, rows = bitmask.data_ptr(), bitmask.shape[1] * 4, bitmask.shape[0]
        plain = [(m, at) for m, at, drafts in entries if not drafts]
        drafted = [e for e in entries if e[2]]
        executor: Any = self._executor
        if plain:
            executor.unsafe_compute_mask_ptr(plain, ptr, size, rows)
        if drafted:
            executor.unsafe_compute_mask_ptr_with_draft_token(drafted, ptr, size, rows)
        return bitmask

    @torch.inference_mode()
    def mask(self, logits: torch.Tensor, samplers: list[ScheduledRequest]) -> None:
        """Set the logits of every token the grammar forbids to -inf, in place, in each constrained row."""
        if self._pending is None:
            return
        bitmask = self._pending.result()
        self._pending = None
        width, row = logits.shape[1], 0
        for s in samplers:
            at = self._rows.get(s.request.request_id)
            if at is not None:
                n = s.num_logit_rows
                logits[row : row + n].add_(self._bias(bitmask[at : at + n], width))
            row += s.num_logit_rows

    @staticmethod
    def _bias(bitmask: torch.Tensor, width: int) -> torch.Tensor:
        n = bitmask.shape[0]
        bias = BIAS.index_select(0, bitmask.view(torch.uint8).flatten().long()).view(n, -1)
        if bias.shape[1] < width:  # logit columns past the tokenizer's vocabulary are never allowed
            bias = torch.cat([bias, bias.new_full((n, width - bias.shape[1]), float("-inf"))], dim=1)
        return bias[:, :width]

    def advance(self, samplers: list[ScheduledRequest], result: SampleResult) -> None:
        for s, tokens in zip(samplers, result.token_ids):
            matcher = self._matchers.get(s.request.request_id)
            if matcher is not None:
                matcher.consume_tokens(tokens)  # type: ignore[attr-defined]

    def forget(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def _llg_tokenizer(self):
        if self._unusable is not None:
            raise ValueError(self._unusable)
        if self._tokenizer is None:
            import llguidance

            started = time.monotonic()
            try:
                self._tokenizer = llguidance.LLTokenizer(
                    self._tokenizer_json(), n_vocab=self._vocab_size, eos_token=self._eos
                )
            except Exception as e:  # noqa: BLE001 - llguidance's reason, kept for every later request
                self._unusable = f"this model's tokenizer cannot be used for grammars: {e}"
                raise ValueError(self._unusable) from None
            log.info("grammar tables for the vocabulary built in %.1f s", time.monotonic() - started)
        return self._tokenizer
