"""POST /v1/completions: one or more prompts, n completions each, whole or streamed."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from tokenfab.engine.types import RequestOutput
from tokenfab.serve.errors import bad_request
from tokenfab.serve.formatting import TokenText, completion_logprobs, usage
from tokenfab.serve.generation import Job, Prompt
from tokenfab.serve.protocol import CompletionRequest
from tokenfab.serve.requests import completion_prompts, max_new_tokens, sampling_params
from tokenfab.serve.state import ServerState
from tokenfab.serve.streaming import Deltas, admitted, event


def prepare(body: CompletionRequest, state: ServerState) -> Job:
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of other than n is not supported (completions are not ranked)", "best_of")
    if body.echo and body.logprobs is not None:
        raise bad_request("echo with logprobs would need prompt logprobs, which are not supported", "echo")
    info = state.info
    prompts = completion_prompts(body, state.tokenizer, info)
    params = sampling_params(body, max_new_tokens(body.max_tokens, prompts, info, "prompt"), body.logprobs, info)
    return Job(f"cmpl-{uuid.uuid4().hex}", prompts, params, body.priority, body.user)


def _prefix(body: CompletionRequest, prompt: Prompt, state: ServerState) -> str:
    if not body.echo:
        return ""
    return prompt.text if prompt.text is not None else state.tokenizer.decode(prompt.token_ids, False)


async def complete(body: CompletionRequest, job: Job, state: ServerState) -> dict:
    finals: dict[int, RequestOutput] = {}
    async for index, out in state.generation.run(job, state.generation.admit(job)):
        if out.finished:
            finals[index] = out
    outputs = [finals[i] for i in range(len(job.prompts))]
    text = TokenText(state.tokenizer)
    choices = []
    for i, (prompt, out) in enumerate(zip(job.prompts, outputs)):
        prefix = _prefix(body, prompt, state)
        for c in out.outputs:
            lp = completion_logprobs(c.logprobs, text, len(prefix)) if c.logprobs is not None else None
            choices.append(
                {
                    "index": i * job.params.n + c.index,
                    "text": prefix + c.text,
                    "logprobs": lp,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                }
            )
    return {
        "id": job.request_id,
        "object": "text_completion",
        "created": int(time.time()),
        "model": state.settings.served_model_name,
        "choices": choices,
        "usage": usage(outputs, state.info.energy_source),
    }


def stream(body: CompletionRequest, job: Job, state: ServerState) -> AsyncIterator[str | None]:
    created, model, n = int(time.time()), state.settings.served_model_name, job.params.n
    text = TokenText(state.tokenizer)

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

    async def events(ticket) -> AsyncIterator[str]:
        deltas, finals = Deltas(), {}
        for i, prompt in enumerate(job.prompts):
            prefix = _prefix(body, prompt, state)
            if prefix:
                yield chunk(
                    [{"index": i * n + k, "text": prefix, "logprobs": None, "finish_reason": None} for k in range(n)]
                )
        async for i, out in state.generation.run(job, ticket):
            choices = []
            for c in out.outputs:
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
            yield chunk([], usage([finals[i] for i in sorted(finals)], state.info.energy_source))

    return admitted(state, job, events)
