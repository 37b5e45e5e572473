"""POST /v1/chat/completions: a conversation through the model's chat template, whole or streamed."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

from tokenfab.engine.types import CompletionOutput, RequestOutput
from tokenfab.serve.errors import bad_request
from tokenfab.serve.formatting import TokenText, chat_logprobs, usage
from tokenfab.serve.generation import Job
from tokenfab.serve.protocol import ChatCompletionRequest
from tokenfab.serve.requests import chat_grammar, chat_prompt, max_new_tokens, sampling_params
from tokenfab.serve.state import ServerState
from tokenfab.serve.streaming import Deltas, admitted, event
from tokenfab.serve.tools import CallParser, ToolPlan, plan, stop_after_call


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
    tool_plan = plan(body, state.tool_template)
    prompt = chat_prompt(body, state.tokenizer, info, state.tool_template)
    limit = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    rules = chat_grammar(body, tool_plan)
    budget = max_new_tokens(limit, [prompt], info, "messages")
    stops = stop_after_call(tool_plan) if tool_plan is not None else []
    params = sampling_params(body, budget, logprobs, info, None, rules, stops)
    session = body.session.id if body.session is not None else None
    return Job(f"chatcmpl-{uuid.uuid4().hex}", [prompt], params, body.priority, body.user, tool_plan, session)


def reply(c: CompletionOutput, tool_plan: ToolPlan | None) -> tuple[dict, str | None]:
    """A finished choice's message and finish reason: its text, or the tool calls parsed from it."""
    if tool_plan is None:
        return {"role": "assistant", "content": c.text}, c.finish_reason
    content, calls = CallParser(tool_plan).feed(c.text, final=True)
    if not calls:
        return {"role": "assistant", "content": content}, c.finish_reason
    message = {"role": "assistant", "content": content.strip() or None, "tool_calls": calls}
    return message, "tool_calls" if c.finish_reason == "stop" else c.finish_reason


async def complete(body: ChatCompletionRequest, job: Job, state: ServerState) -> dict:
    final: RequestOutput | None = None
    async for _, out in state.generation.run(job, state.generation.admit(job)):
        final = out
    assert final is not None, "a generation ends with a finished output"
    text = TokenText(state.tokenizer)
    choices = []
    for c in final.outputs:
        message, finish_reason = reply(c, job.tools)
        choices.append(
            {
                "index": c.index,
                "message": message,
                "logprobs": chat_logprobs(c.logprobs, text) if c.logprobs is not None else None,
                "finish_reason": finish_reason,
                "stop_reason": c.stop_reason,
            }
        )
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

    parsers = {k: CallParser(job.tools) for k in range(job.params.n)} if job.tools is not None else {}

    def delta(c: CompletionOutput, piece: str) -> tuple[dict, str | None]:
        """A choice's new text as a delta (content, or tool calls once each has been read whole)."""
        parser = parsers.get(c.index)
        if parser is None:
            return ({"content": piece} if piece else {}), c.finish_reason
        seen = len(parser.calls)
        content, calls = parser.feed(c.text, final=c.finish_reason is not None)
        new: dict = {"content": content} if content else {}
        if calls:
            new["tool_calls"] = [{"index": seen + k, **call} for k, call in enumerate(calls)]
        finish_reason = "tool_calls" if parser.calls and c.finish_reason == "stop" else c.finish_reason
        return new, finish_reason

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
                change, finish_reason = delta(c, piece)
                choices.append(
                    {
                        "index": c.index,
                        "delta": change,
                        "logprobs": chat_logprobs(logprobs, text) if logprobs is not None else None,
                        "finish_reason": finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                )
            if choices:
                yield chunk(choices)
        if body.stream_options is not None and body.stream_options.include_usage and final is not None:
            yield chunk([], usage([final], state.info.energy_source))

    return admitted(state, job, events)
