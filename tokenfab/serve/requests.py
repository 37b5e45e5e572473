"""Validated API requests -> engine inputs: prompts as token ids, SamplingParams, context-length checks."""

from __future__ import annotations

import json
from typing import cast

from tokenfab.engine.grammar import grammar_error
from tokenfab.engine.messages import CoreInfo
from tokenfab.engine.types import SamplingParams
from tokenfab.serve.errors import APIError, bad_request
from tokenfab.serve.generation import Prompt
from tokenfab.serve.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    ResponseFormat,
    SamplingFields,
    Tool,
)
from tokenfab.serve.tools import JSON_WHITESPACE, Template, ToolPlan, call_grammar, conversation
from tokenfab.tokenizer import Tokenizer


def check_model(requested: str | None, served: str) -> None:
    if requested is not None and requested != served:
        raise APIError(
            404,
            f"The model '{requested}' does not exist; this server serves '{served}'",
            "not_found_error",
            "model",
            "model_not_found",
        )


def completion_prompts(body: CompletionRequest, tokenizer: Tokenizer, info: CoreInfo) -> list[Prompt]:
    raw = body.prompt
    items = [raw] if isinstance(raw, str) or (raw and isinstance(raw[0], int)) else list(raw)
    prompts = []
    for item in items:
        if isinstance(item, str):
            if not item:
                raise bad_request("prompt must not be empty", "prompt")
            check_text_fits(item, tokenizer, info, "prompt")
            prompts.append(Prompt(item, tokenizer.encode(item)))
        else:
            prompts.append(Prompt(None, [int(t) for t in cast(list[int], item)]))
    for p in prompts:
        check_prompt(p.token_ids, info, "prompt")
    return prompts


def chat_prompt(body: ChatCompletionRequest, tokenizer: Tokenizer, info: CoreInfo, template: Template) -> Prompt:
    tools = body.tools if body.tool_choice != "none" else None
    prompt = render_chat(body.messages, body.add_generation_prompt, tokenizer, template, info, tools)
    check_prompt(prompt.token_ids, info, "messages")
    return prompt


def render_chat(
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    tokenizer: Tokenizer,
    template: Template,
    info: CoreInfo | None = None,
    tools: list[Tool] | None = None,
) -> Prompt:
    """The conversation (and tools) through the model's chat template, as text and token ids; with `info`, a
    conversation too long for the context by its characters alone is refused before it is tokenized."""
    turns, template_tools = conversation(messages, tools, template)
    if info is not None:
        check_text_fits("".join(t["content"] for t in turns), tokenizer, info, "messages")
    try:
        text, ids = tokenizer.render_chat(turns, add_generation_prompt, template_tools)
    except Exception as e:  # noqa: BLE001 - a template rejecting a conversation is the caller's input error
        raise bad_request(f"the conversation cannot be rendered by the model's chat template: {e}", "messages") from e
    return Prompt(text, ids)


def check_text_fits(text: str, tokenizer: Tokenizer, info: CoreInfo, param: str) -> None:
    """Refuse, without tokenizing it, a text that has more tokens than the context holds whatever its tokens are
    (each covers at most `max_token_chars` characters; twice that leaves room for normalization)."""
    limit = min(info.max_model_len - 1, info.kv_capacity_tokens)
    if len(text) > 2 * tokenizer.max_token_chars * limit:
        raise bad_request(
            f"This model's maximum context length is {info.max_model_len} tokens; the {param} has {len(text)} "
            f"characters, more tokens than that however it is tokenized. Please reduce the {param}.",
            param,
            "context_length_exceeded",
        )


def check_prompt(ids: list[int], info: CoreInfo, param: str) -> None:
    if not ids:
        raise bad_request("prompt must not be empty", param)
    bad = [t for t in ids if t >= info.vocab_size]
    if bad:
        raise bad_request(f"token ids out of range [0, {info.vocab_size}): {bad[:5]}", param, "invalid_value")
    limit = min(info.max_model_len - 1, info.kv_capacity_tokens)
    if len(ids) > limit:
        raise context_exceeded(len(ids), 1, info.max_model_len, param)


def context_exceeded(prompt: int, new: int, max_len: int, param: str) -> APIError:
    return bad_request(
        f"This model's maximum context length is {max_len} tokens. However, you requested "
        f"{prompt + new} tokens ({prompt} in the prompt, {new} for the completion). Please reduce "
        "the prompt or the completion length.",
        param,
        "context_length_exceeded",
    )


def max_new_tokens(requested: int | None, prompts: list[Prompt], info: CoreInfo, param: str) -> int:
    """The completion budget: as asked, or what the context leaves; never more than the context holds."""
    longest = max(len(p.token_ids) for p in prompts)
    if requested is None:
        return info.max_model_len - longest
    if longest + requested > info.max_model_len:
        raise context_exceeded(longest, requested, info.max_model_len, param)
    return requested


def grammar(body: SamplingFields, response_format: ResponseFormat | None = None) -> str | None:
    """The llguidance grammar a request's completions follow (None: unconstrained); 400 for one it cannot use."""
    import llguidance

    guides = body.guides()
    param, schema = "response_format", response_schema(response_format)
    if len(guides) + (schema is not None) > 1:
        others = guides + (["response_format"] if schema is not None else [])
        raise bad_request(f"send one of {', '.join(others)}", guides[0])
    if body.guided_regex is not None:
        return _usable(llguidance.LLMatcher.grammar_from_regex(body.guided_regex), "guided_regex")
    if body.guided_choice is not None:
        return _usable(llguidance.grammar_from("choice", json.dumps(body.guided_choice)), "guided_choice")
    if body.guided_grammar is not None:
        try:
            return _usable(llguidance.grammar_from("grammar", body.guided_grammar), "guided_grammar")
        except ValueError as e:
            raise bad_request(f"the guided_grammar cannot be used: {e}", "guided_grammar") from None
    if body.guided_json is not None:
        param, schema = "guided_json", _schema(body.guided_json)
    if schema is None:
        return None
    try:
        text = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={"whitespace_pattern": JSON_WHITESPACE})
    except ValueError as e:
        raise bad_request(f"the JSON schema cannot be used: {e}", param) from None
    return _usable(text, param)


def _schema(value: dict | str) -> dict:
    if isinstance(value, dict):
        return value
    try:
        schema = json.loads(value)
    except ValueError:
        raise bad_request("guided_json must be a JSON schema (an object, or one in a string)", "guided_json") from None
    if not isinstance(schema, dict):
        raise bad_request("guided_json must be a JSON schema (an object, or one in a string)", "guided_json")
    return schema


def chat_grammar(body: ChatCompletionRequest, tool_plan: ToolPlan | None) -> str | None:
    """A chat request's grammar: its response_format's, or its tool calls' (forced, or calls or the format)."""
    if tool_plan is None:
        return grammar(body, body.response_format)
    import llguidance

    lark = call_grammar(tool_plan, response_schema(body.response_format))
    if lark is None:
        return None
    try:
        text = llguidance.LLMatcher.grammar_from_lark(lark)
    except ValueError as e:
        raise bad_request(f"the tools' parameter schemas cannot be used: {e}", "tools") from None
    return _usable(text, "tools")


def response_schema(response_format: ResponseFormat | None) -> dict | None:
    """The JSON schema a response_format asks for (None: free text)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return {"type": "object"}
    if response_format.json_schema is None:
        raise bad_request("response_format json_schema needs its json_schema", "response_format.json_schema")
    return response_format.json_schema.schema_


def _usable(text: str, param: str) -> str:
    error = grammar_error(text)
    if error is not None:
        raise bad_request(f"the {param} cannot be used: {error}", param)
    return text


def sampling_params(
    body: SamplingFields,
    max_tokens: int,
    logprobs: int | None,
    info: CoreInfo,
    prompt_logprobs: int | None = None,
    grammar: str | None = None,
    extra_stop: list[str] | None = None,
) -> SamplingParams:
    if body.stream_options is not None and not body.stream:
        raise bad_request("stream_options is only allowed when stream is true", "stream_options")
    if body.min_tokens > max_tokens:
        raise bad_request(f"min_tokens ({body.min_tokens}) must not exceed max_tokens ({max_tokens})", "min_tokens")
    if any(t >= info.vocab_size for t in body.stop_token_ids or []):
        raise bad_request(f"stop_token_ids must be in [0, {info.vocab_size})", "stop_token_ids")
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if any(not s for s in stop):
        raise bad_request("stop strings must not be empty", "stop")
    try:
        return SamplingParams(
            n=body.n,
            max_tokens=max_tokens,
            temperature=_or(body.temperature, 1.0),
            top_p=_or(body.top_p, 1.0),
            top_k=_or(body.top_k, 0),
            min_p=_or(body.min_p, 0.0),
            presence_penalty=_or(body.presence_penalty, 0.0),
            frequency_penalty=_or(body.frequency_penalty, 0.0),
            repetition_penalty=_or(body.repetition_penalty, 1.0),
            seed=body.seed,
            stop=stop + [s for s in extra_stop or [] if s not in stop],
            stop_token_ids=list(body.stop_token_ids or []),
            ignore_eos=body.ignore_eos,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            grammar=grammar,
            min_tokens=body.min_tokens,
            skip_special_tokens=body.skip_special_tokens,
            keep_kv_s=float(body.session.ttl_s) if body.session is not None else 0.0,
        )
    except ValueError as e:
        raise bad_request(str(e)) from None


def _or(value, default):
    return default if value is None else value
