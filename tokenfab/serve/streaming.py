"""What completions and chat streams share: server-sent-event framing (`data: ...`, as OpenAI streams use),
admission before the first byte, the stream's ending, and per-choice deltas (each chunk carries only what the
client has not seen; a finished choice is sent once)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from tokenfab.engine.types import CompletionOutput, TokenLogprobs
from tokenfab.serve.admission import Ticket
from tokenfab.serve.errors import APIError
from tokenfab.serve.generation import Job
from tokenfab.serve.state import ServerState

DONE = "data: [DONE]\n\n"
log = logging.getLogger("tokenfab.serve")


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


async def admitted(
    state: ServerState, job: Job, events: Callable[[Ticket], AsyncIterator[str]]
) -> AsyncIterator[str | None]:
    """Admit the job, yield None (the caller may now answer 200), then the events and [DONE]. A failure after
    the 200 becomes an error event; the ticket is returned however the stream ends."""
    ticket = state.generation.admit(job)
    try:
        yield None
        async for item in events(ticket):
            yield item
        yield DONE
    except APIError as e:
        yield event(e.body())  # the status is already 200: a late failure travels as an error event
        yield DONE
    except Exception:  # noqa: BLE001 - a stream ends with an error event and [DONE], never cut
        log.exception("stream %s failed", job.request_id)
        failure = APIError(500, f"the stream failed (request {job.request_id})", "internal_error", code="internal")
        yield event(failure.body())
        yield DONE
    finally:
        state.generation.admission.release(ticket)


class Deltas:
    def __init__(self) -> None:
        self._sent: dict[int, tuple[int, int]] = {}
        self._done: set[int] = set()

    def new(self, index: int, c: CompletionOutput) -> tuple[str, list[TokenLogprobs] | None, int] | None:
        """(new text, new logprobs, characters sent before) for choice `index`, or None if nothing changed."""
        if index in self._done:
            return None
        chars, tokens = self._sent.get(index, (0, 0))
        if len(c.text) == chars and len(c.token_ids) == tokens and not c.finish_reason:
            return None
        self._sent[index] = (len(c.text), len(c.token_ids))
        if c.finish_reason:
            self._done.add(index)
        return c.text[chars:], (c.logprobs[tokens:] if c.logprobs is not None else None), chars
