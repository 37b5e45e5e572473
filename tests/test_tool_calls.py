"""Tool calling without a model: the call parsers (whole and fed piece by piece give the same content and calls),
the conversation a template with or without tool support receives, and the grammars forced choices use."""

from __future__ import annotations

import json

import pytest
import tokenizers

from tokenfab.engine.grammar import grammar_error
from tokenfab.serve.errors import APIError
from tokenfab.serve.protocol import ChatCompletionRequest
from tokenfab.serve.tools import CallParser, call_grammar, conversation, plan, template_tools
from tokenfab.tokenizer import SpecialTokens, Tokenizer

import llguidance

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather <now> in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}
GEMMA_LIKE = ("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
              "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
QWEN_LIKE = (
    "{% if tools %}<|im_start|>system\n# Tools\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools>"
    "<|im_end|>\n{% endif %}{% for m in messages %}<|im_start|>{{ m.role }}\n{% if m.content %}{{ m.content }}"
    "{% endif %}{% for c in m.tool_calls or [] %}<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
LLAMA_LIKE = "{% if tools %}{{ tools | tojson }}{% endif %}<|python_tag|>{% for m in messages %}{{ m.content }}{% endfor %}"


def request(**fields) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "Paris?"}], **fields})


def tool_plan(choice="auto", parallel=True, template=GEMMA_LIKE, tools=(WEATHER, TIME)):
    body = request(tools=list(tools), tool_choice=choice, parallel_tool_calls=parallel)
    p = plan(body, template_tools(template))
    assert p is not None
    return p


def fed(p, text: str, step: int) -> tuple[str, list[dict]]:
    parser, content, calls = CallParser(p), "", []
    for end in range(step, len(text) + step, step):
        piece, new = parser.feed(text[:end], final=end >= len(text))
        content, calls = content + piece, calls + new
    return content, calls


def shape(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


HERMES_REPLIES = [
    ("Let me check.\n<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}\n</tool_call>",
     "Let me check.\n", [("get_weather", {"city": "Paris"})]),
    ("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Oslo\"}}\n</tool_call>\n<tool_call>\n"
     "{\"name\": \"get_time\", \"arguments\": {}}\n</tool_call>",
     "", [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    ("No call, but a < sign and <tool and <tool_ca in the text.", "No call, but a < sign and <tool and <tool_ca in the text.", []),
    ("<tool_call>\n{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Ri", "<tool_call>\n{\"name\": \"get_weather\", "
     "\"arguments\": {\"city\": \"Ri", []),
    ("<tool_call>{not json}</tool_call> then text", "<tool_call>{not json}</tool_call> then text", []),
    ("<tool_call>\n{\"name\": \"get_time\", \"arguments\": {}}", "", [("get_time", {})]),
]


@pytest.mark.parametrize("text,content,calls", HERMES_REPLIES)
@pytest.mark.parametrize("step", [1, 3, 10_000])
def test_hermes_calls_parse_the_same_whole_and_streamed(text, content, calls, step):
    got_content, got_calls = fed(tool_plan(), text, step)
    assert got_content == content and shape(got_calls) == calls
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in got_calls)


def test_the_parser_holds_back_what_may_open_a_call():
    parser = CallParser(tool_plan())
    assert parser.feed("Sure <tool_c", final=False) == ("Sure ", [])
    assert parser.feed("Sure <tool_cx", final=False) == ("<tool_cx", [])


def test_one_call_when_parallel_calls_are_off():
    text = HERMES_REPLIES[1][0]
    assert shape(fed(tool_plan(parallel=False), text, 10_000)[1]) == [("get_weather", {"city": "Oslo"})]


@pytest.mark.parametrize("step", [1, 10_000])
def test_llama3_json_calls(step):
    p = tool_plan(template=LLAMA_LIKE)
    assert p.template.format.name == "llama3_json" and p.template.native
    two = '{"name": "get_weather", "parameters": {"city": "Rome"}}; {"name": "get_time", "parameters": {}}'
    assert shape(fed(p, two, step)[1]) == [("get_weather", {"city": "Rome"}), ("get_time", {})]
    assert fed(p, "It is sunny in Rome.", step) == ("It is sunny in Rome.", [])
    assert fed(p, '{"name": "get_weather", "parameters": {"ci', step) == ('{"name": "get_weather", "parameters": {"ci', [])


CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}},
        {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
    {"role": "tool", "tool_call_id": "c2", "content": "10:00"},
]


def test_a_template_without_tools_gets_them_described_and_turns_that_alternate():
    body = request(tools=[WEATHER, TIME])
    body = body.model_copy(update={"messages": ChatCompletionRequest.model_validate(
        {"messages": CONVERSATION}).messages})
    template = template_tools(GEMMA_LIKE)
    assert not template.native and template.format.name == "hermes"
    turns, tools = conversation(body.messages, body.tools, template)
    assert tools is None
    assert [t["role"] for t in turns] == ["system", "user", "assistant", "user"]
    assert turns[0]["content"].startswith("Be brief.") and '"name": "get_weather"' in turns[0]["content"]
    assert turns[2]["content"] == ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
                                   '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>')
    assert turns[3]["content"] == "<tool_response>\n18 C\n</tool_response>\n<tool_response>\n10:00\n</tool_response>"


def test_a_template_with_tools_renders_them_itself():
    vocab = {"[UNK]": 0}
    inner = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok = Tokenizer(inner, SpecialTokens(None, (), None, False, QWEN_LIKE))
    messages = ChatCompletionRequest.model_validate({"messages": CONVERSATION}).messages
    template = template_tools(QWEN_LIKE)
    assert template.native and template.format.name == "hermes"
    turns, tools = conversation(messages, request(tools=[WEATHER]).tools, template)
    assert turns[2]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}  # an object, as templates expect
    assert turns[3] == {"role": "tool", "content": "18 C", "tool_call_id": "c1"}
    text = tok.apply_chat_template(turns, True, tools)
    assert '"description": "Weather <now> in a city"' in text  # JSON as Hugging Face renders it, not HTML-escaped
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text


@pytest.mark.parametrize("choice,parallel,alternative", [
    ("required", True, None), ("required", False, None),
    ({"type": "function", "function": {"name": "get_time"}}, True, None), ("auto", True, {"type": "object"})])
def test_forced_choices_have_a_usable_grammar(choice, parallel, alternative):
    p = tool_plan(choice, parallel)
    lark = call_grammar(p, alternative)
    assert lark is not None and grammar_error(llguidance.LLMatcher.grammar_from_lark(lark)) is None
    assert ("call){0,15}" in lark) == (parallel and choice in ("required", "auto"))
    assert call_grammar(tool_plan("auto")) is None  # auto without a format: the model writes what it likes


def test_inconsistent_tool_requests_are_refused():
    with pytest.raises(APIError) as e:
        plan(request(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}),
             template_tools(GEMMA_LIKE))
    assert e.value.body()["error"]["param"] == "response_format"
    assert plan(request(tools=[WEATHER], tool_choice="none"), template_tools(GEMMA_LIKE)) is None
