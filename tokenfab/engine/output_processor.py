"""OutputProcessor: incremental detokenization, stop strings, and grouping n > 1 completions into one output.

Text is decoded with `tokenizers`' DecodeStream, which holds back bytes of a multi-byte character until it is
complete. While streaming, the last (longest stop string - 1) characters are held back too, so a stop string that
arrives split across tokens is never shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenfab.engine.types import CompletionOutput, Request, RequestOutput
from tokenfab.tokenizer import Tokenizer


@dataclass(slots=True)
class Detokenized:
    """One completion's text state."""

    request: Request
    index: int
    stream: object
    text: str = ""
    stop_hit: str | None = None

    def add(self, tokenizer: Tokenizer, token_ids: list[int]) -> None:
        before = len(self.text)
        for token in token_ids:
            piece = self.stream.step(tokenizer.inner, token)
            if piece:
                self.text += piece
        self._check_stop(before)

    def _check_stop(self, before: int) -> None:
        for stop in self.request.params.stop:
            at = self.text.find(stop, max(0, before - len(stop) + 1))
            if at != -1:
                self.text = self.text[:at]
                self.stop_hit = stop
                return

    def visible_text(self, finished: bool) -> str:
        hold = max((len(s) for s in self.request.params.stop), default=1) - 1
        return self.text if finished or hold == 0 else self.text[: max(0, len(self.text) - hold)]


@dataclass(slots=True)
class Group:
    """A prompt's completions (n of them) and the caller-facing request id."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    children: list[Detokenized] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return all(c.request.finished for c in self.children)


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.groups: dict[str, Group] = {}
        self.child_to_group: dict[str, tuple[Group, Detokenized]] = {}

    def add_group(self, request_id: str, prompt: str | None, children: list[Request]) -> None:
        group = Group(request_id, prompt, children[0].prompt_token_ids)
        for index, child in enumerate(children):
            det = Detokenized(child, index, self.tokenizer.decode_stream(child.params.skip_special_tokens))
            group.children.append(det)
            self.child_to_group[child.request_id] = (group, det)
        self.groups[request_id] = group

    def children(self, request_id: str) -> list[Request]:
        group = self.groups.get(request_id)
        return [c.request for c in group.children] if group else []

    def process(self, new_tokens: dict[str, list[int]]) -> tuple[list[Request], list[Group]]:
        """Detokenize new tokens; returns requests that hit a stop string and the groups that changed."""
        stopped: list[Request] = []
        touched: dict[str, Group] = {}
        for child_id, tokens in new_tokens.items():
            group, det = self.child_to_group[child_id]
            det.add(self.tokenizer, tokens)
            if det.stop_hit is not None and not det.request.finished:
                stopped.append(det.request)
            touched[group.request_id] = group
        return stopped, list(touched.values())

    def make_output(self, group: Group) -> RequestOutput:
        outs = [_completion(det) for det in group.children]
        first = group.children[0].request
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, outs, group.finished,
                             first.num_cached_tokens)

    def drop_finished(self, group: Group) -> None:
        if group.finished:
            self.groups.pop(group.request_id, None)
            for det in group.children:
                self.child_to_group.pop(det.request.request_id, None)


def _completion(det: Detokenized) -> CompletionOutput:
    request = det.request
    finished = request.finished
    reason = request.status.value if finished else None
    stop_reason = det.stop_hit if det.stop_hit is not None else request.stop_reason
    logprobs = list(request.output_logprobs) if request.params.logprobs is not None else None
    return CompletionOutput(det.index, det.visible_text(finished), list(request.output_token_ids), reason,
                            stop_reason, logprobs)
