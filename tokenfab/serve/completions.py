"""POST /v1/completions: one or more prompts, n completions each, whole or streamed.

With `echo` and `logprobs` the prompt's tokens are scored as well (first token without a logprob), from the
prefill; `max_tokens: 0` (only with echo) returns the scored prompt alone, as evaluation harnesses ask for a
loglikelihood. The engine then samples one token, which is neither returned nor counted.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from tokenfab.engine.types import CompletionOutput, RequestOutput
from tokenfab.serve.errors import bad_request
from tokenfab.serve.formatting import TokenText, completion_logprobs, echoed_logprobs, joined_logprobs, usage
from tokenfab.serve.generation import Job, Prompt
from tokenfab.serve.protocol import CompletionRequest
from tokenfab.serve.requests import completion_prompts, grammar, max_new_tokens, sampling_params
from tokenfab.serve.state import ServerState
from tokenfab.serve.streaming import Deltas, admitted, event


def prepare(body: CompletionRequest, state: ServerState) -> Job:
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of other than n is not supported (completions are not ranked)", "best_of")
    if body.max_tokens == 0 and not body.echo:
        raise bad_request("max_tokens 0 needs echo: the prompt alone is returned, scored with logprobs", "max_tokens")
    info = state.info
    prompts = completion_prompts(body, state.tokenizer, info)
    limit = 1 if body.max_tokens == 0 else body.max_tokens
    scored = body.logprobs if body.echo else None
    budget = max_new_tokens(limit, prompts, info, "prompt")
    params = sampling_params(body, budget, body.logprobs, info, scored, grammar(body))
    session = body.session.id if body.session is not None else None
    return Job(f"cmpl-{uuid.uuid4().hex}", prompts, params, body.priority, body.user, session=session)


def _generates(body: CompletionRequest) -> bool:
    return body.max_tokens != 0


def _prefix(body: CompletionRequest, prompt: Prompt, state: ServerState) -> str:
    if not body.echo:
        return ""
    return prompt.text if prompt.text is not None else state.tokenizer.decode(prompt.token_ids, False)


def _prompt_logprobs(body: CompletionRequest, prompt: Prompt, out: RequestOutput, text: TokenText) -> dict | None:
    if not body.echo or body.logprobs is None:
        return None
    return echoed_logprobs(prompt.token_ids, out.prompt_logprobs or [], text)


def _choice(body: CompletionRequest, index: int, prefix: str, head: dict | None, c: CompletionOutput, text: TokenText):
    """One whole choice: the echoed prompt (and its logprobs), then what was generated, unless only scored."""
    generates = _generates(body)
    tail = completion_logprobs(c.logprobs, text, len(prefix)) if c.logprobs is not None and generates else None
    return {
        "index": index,
        "text": prefix + (c.text if generates else ""),
        "logprobs": joined_logprobs(head, tail) if head is not None else tail,
        "finish_reason": c.finish_reason if generates else "length",
        "stop_reason": c.stop_reason if generates else None,
    }


async def complete(body: CompletionRequest, job: Job, state: ServerState) -> dict:
    finals: dict[int, RequestOutput] = {}
    async for index, out in state.generation.run(job, state.generation.admit(job)):
        if out.finished:
            finals[index] = out
    outputs = [finals[i] for i in range(len(job.prompts))]
    text = TokenText(state.tokenizer)
    choices = []
    for i, (prompt, out) in enumerate(zip(job.prompts, outputs)):
        prefix, head = _prefix(body, prompt, state), _prompt_logprobs(body, prompt, out, text)
        choices += [_choice(body, i * job.params.n + c.index, prefix, head, c, text) for c in out.outputs]
    return {
        "id": job.request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.settings.served_model_name,
        "choices": choices,
        "usage": usage(outputs, state.info.energy_source, _generates(body)),
    }


def stream(body: CompletionRequest, job: Job, state: ServerState) -> AsyncIterator[str | None]:
    created, model, n = int(time.time()), state.settings.served_model_name, job.params.n
    text = TokenText(state.tokenizer)
    generates = _generates(body)
    scored = body.echo and body.logprobs is not None

    def chunk(choices: list[dict], usage_: dict | None = None) -> str:
        return event(
            {
                "id": job.request_id,
                "object": "text_completion",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": usage_,
            }
        )

    def echo_chunk(i: int, out: RequestOutput | None) -> str:
        prompt = job.prompts[i]
        head = _prompt_logprobs(body, prompt, out, text) if out is not None else None
        prefix = _prefix(body, prompt, state)
        return chunk([{"index": i * n + k, "text": prefix, "logprobs": head, "finish_reason": None} for k in range(n)])

    async def events(ticket) -> AsyncIterator[str]:
        deltas, finals, echoed = Deltas(), {}, set()
        if body.echo and not scored:  # the prompt goes first; scored, it waits for the prefill's logprobs
            for i in range(len(job.prompts)):
                echoed.add(i)
                yield echo_chunk(i, None)
        async for i, out in state.generation.run(job, ticket):
            if body.echo and i not in echoed:
                echoed.add(i)
                yield echo_chunk(i, out)
            choices = []
            for c in out.outputs:
                if not generates:
                    if c.finish_reason and deltas.new(i * n + c.index, c) is not None:
                        choices.append(
                            {
                                "index": i * n + c.index,
                                "text": "",
                                "logprobs": None,
                                "finish_reason": "length",
                                "stop_reason": None,
                            }
                        )
                    continue
                new = deltas.new(i * n + c.index, c)
                if new is None:
                    continue
                piece, logprobs, before = new
                choices.append(
                    {
                        "index": i * n + c.index,
                        "text": piece,
                        "logprobs": completion_logprobs(logprobs, text, before) if logprobs is not None else None,
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                )
            if out.finished:
                finals[i] = out
            if choices:
                yield chunk(choices)
        if body.stream_options is not None and body.stream_options.include_usage:
            yield chunk([], usage([finals[i] for i in sorted(finals)], state.info.energy_source, generates))

    return admitted(state, job, events)
