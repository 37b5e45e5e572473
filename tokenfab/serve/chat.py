"""POST /v1/chat/completions: a conversation through the model's chat template, whole or streamed."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from tokenfab.engine.types import RequestOutput
from tokenfab.serve.errors import bad_request
from tokenfab.serve.formatting import TokenText, chat_logprobs, usage
from tokenfab.serve.generation import Job
from tokenfab.serve.protocol import ChatCompletionRequest
from tokenfab.serve.requests import chat_prompt, grammar, max_new_tokens, sampling_params
from tokenfab.serve.state import ServerState
from tokenfab.serve.streaming import Deltas, admitted, event


def prepare(body: ChatCompletionRequest, state: ServerState) -> Job:
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs requires logprobs to be true", "top_logprobs")
    if (
        body.max_tokens is not None
        and body.max_completion_tokens is not None
        and body.max_tokens != body.max_completion_tokens
    ):
        raise bad_request("max_tokens and max_completion_tokens disagree; send one", "max_completion_tokens")
    info = state.info
    prompt = chat_prompt(body, state.tokenizer, info)
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    rules = grammar(body, body.response_format)
    params = sampling_params(body, max_new_tokens(limit, [prompt], info, "messages"), logprobs, info, None, rules)
    return Job(f"chatcmpl-{uuid.uuid4().hex}", [prompt], params, body.priority, body.user)


async def complete(body: ChatCompletionRequest, job: Job, state: ServerState) -> dict:
    final: RequestOutput | None = None
    async for _, out in state.generation.run(job, state.generation.admit(job)):
        final = out
    assert final is not None, "a generation ends with a finished output"
    text = TokenText(state.tokenizer)
    choices = [
        {
            "index": c.index,
            "message": {"role": "assistant", "content": c.text},
            "logprobs": chat_logprobs(c.logprobs, text) if c.logprobs is not None else None,
            "finish_reason": c.finish_reason,
            "stop_reason": c.stop_reason,
        }
        for c in final.outputs
    ]
    return {
        "id": job.request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": state.settings.served_model_name,
        "choices": choices,
        "usage": usage([final], state.info.energy_source),
    }


def stream(body: ChatCompletionRequest, job: Job, state: ServerState) -> AsyncIterator[str | None]:
    created, model = int(time.time()), state.settings.served_model_name
    text = TokenText(state.tokenizer)

    def chunk(choices: list[dict], usage_: dict | None = None) -> str:
        return event(
            {
                "id": job.request_id,
                "object": "chat.completion.chunk",
                "created": created,
                "model": model,
                "choices": choices,
                "usage": usage_,
            }
        )

    async def events(ticket) -> AsyncIterator[str]:
        deltas, final = Deltas(), None
        yield chunk(
            [
                {"index": k, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                for k in range(job.params.n)
            ]
        )
        async for _, out in state.generation.run(job, ticket):
            final = out
            choices = []
            for c in out.outputs:
                new = deltas.new(c.index, c)
                if new is None:
                    continue
                piece, logprobs, _ = new
                choices.append(
                    {
                        "index": c.index,
                        "delta": {"content": piece} if piece else {},
                        "logprobs": chat_logprobs(logprobs, text) if logprobs is not None else None,
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                )
            if choices:
                yield chunk(choices)
        if body.stream_options is not None and body.stream_options.include_usage and final is not None:
            yield chunk([], usage([final], state.info.energy_source))

    return admitted(state, job, events)
