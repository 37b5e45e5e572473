"""Tool calling on the real default model with the official openai client: `required` and named choices always give
calls that parse and follow the tool's schema (greedy, sampled and streamed); a two-turn conversation feeds a tool's
result back; auto with a response_format gives calls or schema-valid JSON; `none` leaves the tools out."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

pytestmark = pytest.mark.slow

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 40}},
        "required": ["timezone"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                           "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
ASK = [{"role": "user", "content": "What is the weather in Paris right now?"}]


@pytest.fixture(scope="module")
def client(gemma_server):
    return openai.OpenAI(base_url=f"{gemma_server.url}/v1", api_key="unused", max_retries=0)


def check_calls(message, names) -> list[tuple[str, dict]]:
    calls = []
    for call in message.tool_calls or []:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        arguments = json.loads(call.function.arguments)
        jsonschema.validate(arguments, SCHEMAS[call.function.name])
        calls.append((call.function.name, arguments))
    return calls


def streamed_calls(stream) -> tuple[list[tuple[str, dict]], str | None]:
    """The tool calls a stream's deltas add up to (OpenAI's shape: index, then id, name and argument pieces)."""
    names: dict[int, str] = {}
    arguments: dict[int, str] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            for d in choice.delta.tool_calls or []:
                if d.function.name:
                    names[d.index] = d.function.name
                arguments[d.index] = arguments.get(d.index, "") + (d.function.arguments or "")
            finish = choice.finish_reason or finish
    return [(names[i], json.loads(arguments[i])) for i in sorted(names)], finish


@pytest.mark.parametrize("choice,names", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
])
def test_forced_calls_always_parse(client, choice, names):
    kw = dict(model="gemma-3-270m", messages=ASK, tools=TOOLS, tool_choice=choice, parallel_tool_calls=False,
              max_tokens=80)
    greedy = client.chat.completions.create(temperature=0, **kw)
    sampled = client.chat.completions.create(temperature=1.0, seed=7, n=4, **kw)
    for c in [*greedy.choices, *sampled.choices]:
        assert c.finish_reason == "tool_calls" and c.message.content is None
        assert len(check_calls(c.message, names)) == 1
    calls, finish = streamed_calls(client.chat.completions.create(temperature=0, stream=True, **kw))
    assert finish == "tool_calls" and calls == check_calls(greedy.choices[0].message, names)


def test_parallel_required_calls_each_parse(client):
    reply = client.chat.completions.create(model="gemma-3-270m", messages=ASK, tools=TOOLS, tool_choice="required",
                                           max_tokens=120, temperature=0)
    choice = reply.choices[0]
    assert check_calls(choice.message, set(SCHEMAS)) and choice.finish_reason in ("tool_calls", "length")


def test_two_turn_tool_conversation(client, gemma_server):
    first = client.chat.completions.create(model="gemma-3-270m", messages=ASK, tools=TOOLS, max_tokens=80,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}},
                                           temperature=0)
    call = first.choices[0].message.tool_calls[0]
    turns = [*ASK, first.choices[0].message.model_dump(exclude_none=True),
             {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 18, "sky": "clear"})}]
    second = client.chat.completions.create(model="gemma-3-270m", messages=turns, tools=TOOLS, max_tokens=40,
                                            temperature=0)
    assert second.choices[0].finish_reason in ("stop", "length", "tool_calls")
    rendered = httpx.post(f"{gemma_server.url}/tokenize", json={"messages": turns, "tools": TOOLS}, timeout=60).json()
    assert rendered["count"] == second.usage.prompt_tokens
    text = httpx.post(f"{gemma_server.url}/detokenize", json={"tokens": rendered["tokens"]}, timeout=60).json()
    assert '<tool_response>\n{"temperature": 18, "sky": "clear"}\n</tool_response>' in text["prompt"]
    assert call.function.arguments.replace(" ", "") in text["prompt"].replace(" ", "")
    again = client.chat.completions.create(model="gemma-3-270m", messages=turns, tools=TOOLS, max_tokens=80,
                                           tool_choice="required", parallel_tool_calls=False, temperature=0)
    assert len(check_calls(again.choices[0].message, set(SCHEMAS))) == 1


def test_auto_with_a_response_format_gives_calls_or_valid_json(client):
    answer = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 30}},
              "required": ["answer"], "additionalProperties": False}
    reply = client.chat.completions.create(
        model="gemma-3-270m", messages=ASK, tools=TOOLS, max_tokens=80, temperature=1.0, seed=3, n=4,
        parallel_tool_calls=False,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": answer}})
    for c in reply.choices:
        if c.message.tool_calls:
            assert c.finish_reason == "tool_calls" and len(check_calls(c.message, set(SCHEMAS))) == 1
        else:
            assert c.finish_reason == "stop"
            jsonschema.validate(json.loads(c.message.content), answer)


def test_tool_choice_none_leaves_the_tools_out(client):
    with_tools = client.chat.completions.create(model="gemma-3-270m", messages=ASK, tools=TOOLS, max_tokens=8,
                                                temperature=0, tool_choice="auto")
    without = client.chat.completions.create(model="gemma-3-270m", messages=ASK, tools=TOOLS, max_tokens=8,
                                             temperature=0, tool_choice="none")
    plain = client.chat.completions.create(model="gemma-3-270m", messages=ASK, max_tokens=8, temperature=0)
    assert without.usage.prompt_tokens == plain.usage.prompt_tokens < with_tools.usage.prompt_tokens
    assert without.choices[0].message.tool_calls is None
    assert without.choices[0].message.content == plain.choices[0].message.content
