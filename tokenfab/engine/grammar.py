"""Structured output: requests that generate under a grammar (JSON schema, regex, Lark), through llguidance.

Each such request has a matcher that follows its emitted tokens. Before sampling, the matcher's allowed-token
bitmask sets every other token's logit to -inf in that request's row, so whatever the sampler draws parses; after
sampling, the emitted tokens advance the matcher. Once the grammar is complete only EOS is allowed, and EOS ends
the request. The state is the emitted tokens' prefix, so it survives preemption (which recomputes KV, not
tokens). Requests under a grammar get no speculative drafts. The tokenizer table llguidance needs is built on the
first grammar request (about a second for a 262k vocabulary).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from tokenfab.engine.types import Request, SampleResult, ScheduledRequest

log = logging.getLogger("tokenfab.engine")
BITS = torch.arange(32, dtype=torch.int32)


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

    def add(self, request: Request) -> None:
        """Start the request's matcher; ValueError for a grammar llguidance refuses."""
        grammar = request.params.grammar
        if grammar is None:
            return
        import llguidance

        matcher = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"the grammar cannot be used: {matcher.get_error()}")
        self._matchers[request.request_id] = matcher

    def constrained(self, request_id: str) -> bool:
        return request_id in self._matchers

    @torch.inference_mode()
    def mask(self, logits: torch.Tensor, samplers: list[ScheduledRequest]) -> None:
        """Set the logits of every token the grammar forbids to -inf, in place (one row per constrained request:
        they verify no drafts)."""
        row = 0
        for s in samplers:
            matcher = self._matchers.get(s.request.request_id)
            if matcher is not None:
                logits[row].masked_fill_(~self._allowed(matcher, logits.shape[1]), float("-inf"))
            row += s.num_logit_rows

    def advance(self, samplers: list[ScheduledRequest], result: SampleResult) -> None:
        for s, tokens in zip(samplers, result.token_ids):
            matcher = self._matchers.get(s.request.request_id)
            if matcher is not None:
                matcher.consume_tokens(tokens)  # type: ignore[attr-defined]

    def forget(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)

    def _allowed(self, matcher: object, width: int) -> torch.Tensor:
        words = torch.frombuffer(bytearray(matcher.compute_bitmask()), dtype=torch.int32)  # type: ignore[attr-defined]
        bits = ((words.unsqueeze(1) >> BITS) & 1).flatten().bool()
        if bits.numel() < width:
            bits = torch.cat([bits, bits.new_zeros(width - bits.numel())])
        return bits[:width]

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
