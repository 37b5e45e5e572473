"""Structured output on the real default model with the official openai client: every completion under a JSON
schema validates (greedy, sampled and streamed), json_object gives an object, guided_regex matches, an unusable
schema is a 400 naming response_format; grammar + n-gram speculation gives the grammar's greedy text."""

from __future__ import annotations

import json
import re

import jsonschema
import openai
import pytest

import llguidance

from test_migration import generate
from tokenfab import LLM, SamplingParams
from tokenfab.engine.messages import CoreRequest
from tokenfab.models.loading import load_tokenizer, resolve_model
from tokenfab.serve.protocol import ChatCompletionRequest
from tokenfab.serve.requests import grammar

pytestmark = pytest.mark.slow

SCHEMAS = {
    "person": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 24},
                                                "age": {"type": "integer", "minimum": 0, "maximum": 150}},
               "required": ["name", "age"], "additionalProperties": False},
    "colors": {"type": "object", "properties": {"colors": {"type": "array", "minItems": 1, "maxItems": 3,
                                                           "items": {"enum": ["red", "green", "blue"]}}},
               "required": ["colors"], "additionalProperties": False},
    "flags": {"type": "object", "properties": {"ok": {"type": "boolean"}, "score": {"type": "number"},
                                               "tags": {"type": "array", "maxItems": 2,
                                                        "items": {"type": "string", "maxLength": 10}}},
              "required": ["ok", "score"], "additionalProperties": False},
}
ASK = [{"role": "user", "content": "Answer in JSON: describe a person, their favourite colours and a score."}]


@pytest.fixture(scope="module")
def client(gemma_server):
    return openai.OpenAI(base_url=f"{gemma_server.url}/v1", api_key="unused", max_retries=0)


def schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


@pytest.mark.parametrize("name", list(SCHEMAS))
def test_every_completion_follows_the_schema(client, name):
    kw = dict(model="gemma-3-270m", messages=ASK, max_tokens=80, response_format=schema_format(name))
    greedy = client.chat.completions.create(temperature=0, **kw)
    sampled = client.chat.completions.create(temperature=1.0, seed=3, n=3, **kw)
    for choice in [*greedy.choices, *sampled.choices]:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])
    stream = client.chat.completions.create(temperature=0, stream=True, **kw)
    streamed = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert streamed == greedy.choices[0].message.content


def test_json_object_and_regex(client):
    """A free JSON object from a 270M model rambles on to max_tokens: every token it wrote still followed the
    grammar (llguidance's own matcher accepts them all)."""
    obj = client.chat.completions.create(model="gemma-3-270m", messages=ASK, max_tokens=60, temperature=0,
                                         response_format={"type": "json_object"}, logprobs=True)
    body = ChatCompletionRequest.model_validate({"messages": ASK, "response_format": {"type": "json_object"}})
    tokenizer = load_tokenizer(resolve_model(None))
    matcher = llguidance.LLMatcher(llguidance.LLTokenizer(tokenizer.inner.to_str()), grammar(body, body.response_format))
    ids = tokenizer.encode(obj.choices[0].message.content, add_special_tokens=False)
    assert obj.choices[0].message.content.startswith("{") and matcher.consume_tokens(ids) and not matcher.is_error()
    phone = client.completions.create(model="gemma-3-270m", prompt="Call me at", max_tokens=12, temperature=0.7,
                                      seed=1, extra_body={"guided_regex": r" [0-9]{3}-[0-9]{4}"})
    assert re.fullmatch(r" [0-9]{3}-[0-9]{4}", phone.choices[0].text)
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 5}}}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="gemma-3-270m", messages=ASK, response_format=bad)
    assert e.value.body["param"] == "response_format"


def test_grammar_with_ngram_speculation_gives_the_grammar_text():
    """Drafts are verified against the grammar's mask at each position: the greedy text is the grammar's own, drafts
    the grammar allows are accepted, and sampled completions still follow the schema."""
    ask = [{"role": "user", "content": 'Repeat this JSON: {"name": "Ann Lee", "age": 31}. Again: {"name": "Ann Lee", '
                                       '"age": 31}. Once more:'}]
    body = ChatCompletionRequest.model_validate({"messages": ask, "response_format": schema_format("person")})
    params = SamplingParams(max_tokens=60, temperature=0, grammar=grammar(body, body.response_format))
    plain = LLM(kv_cache_memory_gb=0.25).chat(ask, params)[0].outputs[0].text
    llm = LLM(kv_cache_memory_gb=0.25, speculative="ngram")
    speculative = llm.chat(ask, params)[0].outputs[0].text
    assert speculative == plain
    jsonschema.validate(json.loads(plain), SCHEMAS["person"])
    assert llm.engine.core.stats().spec.accepted_tokens > 0
    sampled = SamplingParams(max_tokens=60, temperature=0.8, seed=5, n=4, grammar=params.grammar)
    for c in llm.chat(ask, sampled)[0].outputs:
        jsonschema.validate(json.loads(c.text), SCHEMAS["person"])


def test_guided_extensions(client):
    kw = dict(model="gemma-3-270m", prompt="My favourite colour is", max_tokens=20, temperature=1.0, seed=2, n=3)
    choice = client.completions.create(extra_body={"guided_choice": ["red", "green", "deep blue"]}, **kw)
    assert {c.text for c in choice.choices} <= {"red", "green", "deep blue"}
    schema = {"type": "object", "properties": {"colour": {"enum": ["red", "blue"]}}, "required": ["colour"],
              "additionalProperties": False}
    for guided_json in (schema, json.dumps(schema)):
        js = client.completions.create(extra_body={"guided_json": guided_json}, **kw)
        for c in js.choices:
            jsonschema.validate(json.loads(c.text), schema)
    lark = 'start: " " COLOUR "!"\nCOLOUR: "red" | "blue"'
    gbnf = 'root ::= " " colour "!"\ncolour ::= "red" | "blue"'
    for guided_grammar in (lark, gbnf):
        g = client.completions.create(extra_body={"guided_grammar": guided_grammar}, **kw)
        assert all(c.text in (" red!", " blue!") for c in g.choices)
    for body, param in [({"guided_choice": ["a"], "guided_regex": "b"}, "guided_regex"),
                        ({"guided_grammar": "start: @@"}, "guided_grammar"),
                        ({"guided_json": "[1, 2]"}, "guided_json")]:
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(extra_body=body, **kw)
        assert e.value.body["param"] == param


def test_grammars_in_a_mixed_batch_and_across_preemption():
    """Requests with and without grammars batched together give their solo outputs, and so do they when a KV cache
    too small for all of them preempts and recomputes some (the grammar state is the emitted tokens')."""
    facts = [" ".join(f"Person {i} owns item {i * 31 + k}." for k in range(8)) for i in range(4)]
    asks = [[{"role": "user", "content": f"{facts[i]} Describe person {i} in JSON."}] for i in range(4)]
    body = ChatCompletionRequest.model_validate({"messages": ASK, "response_format": schema_format("person")})
    rules = grammar(body, body.response_format)
    params = [SamplingParams(max_tokens=48, temperature=0, grammar=rules) if i % 2 == 0 else
              SamplingParams(max_tokens=48, temperature=0, ignore_eos=True) for i in range(4)]
    llm = LLM(kv_cache_memory_gb=0.25)
    solo = [llm.chat(a, p)[0].outputs[0].text for a, p in zip(asks, params)]
    assert [o.outputs[0].text for o in llm.chat(asks, params)] == solo
    for text in solo[::2]:
        jsonschema.validate(json.loads(text), SCHEMAS["person"])
    tight = LLM(kv_cache_memory_gb=0.008, max_model_len=160)
    assert [o.outputs[0].text for o in tight.chat(asks, params)] == solo
    assert tight.engine.core.stats().scheduler.num_preemptions > 0


def test_a_resumed_sequence_replays_its_grammar():
    """A constrained, sampled sequence moved to another replica mid-way (prompt + its tokens so far) continues with
    the tokens it would have drawn, the grammar state replayed over what it had; tokens that break the grammar are
    refused."""
    body = ChatCompletionRequest.model_validate({"messages": ASK, "response_format": schema_format("person")})
    params = SamplingParams(max_tokens=48, temperature=0.8, seed=11, grammar=grammar(body, body.response_format))
    llm = LLM(kv_cache_memory_gb=0.25)
    prompt = llm.tokenizer.encode_chat(ASK)
    whole = generate(llm.engine.core, "whole", prompt, params, [])
    jsonschema.validate(json.loads(llm.tokenizer.decode(whole, True)), SCHEMAS["person"])
    for cut in (1, len(whole) // 2, len(whole) - 2):
        assert whole[:cut] + generate(llm.engine.core, f"from-{cut}", prompt, params, whole[:cut]) == whole
    bad = llm.tokenizer.encode("not json", add_special_tokens=False)
    with pytest.raises(ValueError, match="do not follow the grammar"):
        llm.engine.core.add_request(CoreRequest("bad", prompt, params, 0.0, output_token_ids=bad))
