"""Tool calling (OpenAI `tools`, `tool_choice`, `parallel_tool_calls`): tools rendered into the prompt, the model's
calls parsed into `tool_calls` (whole, or as stream deltas), `required` and named choices enforced by a grammar.

Two call formats, picked from the chat template (or `--tool-call-parser`):
- hermes (Qwen 2.5/3, Hermes, and every template that cannot render tools): each call is
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, anywhere in the reply;
- llama3_json (Llama 3.1+ templates): the whole reply is `{"name": ..., "parameters": {...}}`, calls joined by "; ".
A template that renders tools itself gets them, the assistant turns' `tool_calls` (arguments as objects) and
`role: tool` results, as Hugging Face templates expect. For one that does not (Gemma 3), the tools and the format
are described in the system turn, earlier calls are written in the format, and tool results come back in user
turns (merged with a neighbouring user turn, so turns still alternate).

A parser sees a choice's text as it grows and only ever releases text that can no longer become part of a call,
so a stream's content and tool-call deltas add up to the whole response's.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from tokenfab.serve.errors import bad_request
from tokenfab.serve.protocol import ChatCompletionRequest, ChatMessage, NamedToolChoice, Tool


@dataclass(frozen=True, slots=True)
class CallFormat:
    name: str
    open: str
    """Text that starts a call ("" where the whole reply is calls)."""
    close: str
    separator: str
    """Between two calls in one reply."""
    args_key: str

    def write(self, name: str, arguments: Any) -> str:
        body = json.dumps({"name": name, self.args_key: arguments}, ensure_ascii=False)
        return f"{self.open}\n{body}\n{self.close}" if self.open else body


HERMES = CallFormat("hermes", "<tool_call>", "</tool_call>", "\n", "arguments")
LLAMA3_JSON = CallFormat("llama3_json", "", "", "; ", "parameters")
FORMATS = {f.name: f for f in (HERMES, LLAMA3_JSON)}
PARSERS = ("auto", *FORMATS)

JSON_WHITESPACE = r"[\x20\x0A\x0D\x09]{0,12}"
"""At most 12 whitespace characters between JSON tokens (enough for indentation): a small model left free
whitespace can emit newlines until max_tokens and never close the object."""

MAX_CALLS = 16
"""Calls in one reply generated under a grammar: a model that is not trained for tools may otherwise call again
and again until max_tokens (Gemma 3 270M made 116 identical calls)."""

TOOLS_PREAMBLE = (
    "You can call functions. To call one, reply with a block of this form (one block per call) and nothing else:\n"
    '<tool_call>\n{{"name": "<function name>", "arguments": {{<arguments as JSON>}}}}\n</tool_call>\n'
    "A function's result comes back to you in a <tool_response> block. The functions:\n{functions}"
)


@dataclass(frozen=True, slots=True)
class Template:
    """How a chat template takes tools."""

    format: CallFormat
    native: bool
    """The template renders `tools`, `tool_calls` and tool results itself."""


@lru_cache(maxsize=8)
def template_tools(chat_template: str | None, parser: str = "auto") -> Template:
    text = chat_template or ""
    native = re.search(r"\btools\b", text) is not None
    if parser != "auto":
        return Template(FORMATS[parser], native)
    llama = "<|python_tag|>" in text or ("ipython" in text and native)
    return Template(LLAMA3_JSON if llama else HERMES, native)


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """What a chat request's tools ask of its generation and of its response."""

    tools: list[Tool]
    choice: str
    """auto, required or the function's name."""
    parallel: bool
    template: Template

    @property
    def forced(self) -> bool:
        return self.choice != "auto"

    def names(self) -> list[str]:
        return [t.function.name for t in self.tools] if self.choice in ("auto", "required") else [self.choice]


def plan(body: ChatCompletionRequest, template: Template) -> ToolPlan | None:
    """The request's tool calling (None: the reply is plain content); 400 for an inconsistent request."""
    choice = body.tool_choice
    if not body.tools:
        if choice is not None and choice != "none":
            raise bad_request("tool_choice needs tools", "tool_choice")
        return None
    names = [t.function.name for t in body.tools]
    if len(set(names)) != len(names):
        raise bad_request("tool names must be unique", "tools")
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in names:
            raise bad_request(f"tool_choice names '{choice.function.name}', which is not in tools", "tool_choice")
        chosen = choice.function.name
    else:
        chosen = choice or "auto"
    if chosen == "none":
        return None
    if body.guides():
        name = body.guides()[0]
        raise bad_request(f"{name} cannot be combined with tools; send tool_choice none", name)
    forced = chosen != "auto"
    fmt = body.response_format
    if forced and fmt is not None and fmt.type != "text":
        raise bad_request(f"response_format cannot be combined with tool_choice {chosen!r}", "response_format")
    # A named choice is one call of that function (as OpenAI's); required may be several unless parallel is off.
    parallel = body.parallel_tool_calls and chosen in ("auto", "required")
    return ToolPlan(list(body.tools), chosen, parallel, template)


# -- the prompt ---------------------------------------------------------------------------------------------------


def conversation(
    messages: list[ChatMessage], tools: list[Tool] | None, template: Template
) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The turns and the `tools` argument for the chat template."""
    if template.native:
        turns = [_native_turn(m) for m in messages]
        return turns, [t.model_dump(exclude_none=True) for t in tools] if tools else None
    return _described(messages, tools, template.format), None


def _native_turn(m: ChatMessage) -> dict[str, Any]:
    turn: dict[str, Any] = {"role": m.role if m.role != "developer" else "system", "content": m.text()}
    if m.tool_calls:
        turn["tool_calls"] = [
            {"id": c.id, "type": "function", "function": {"name": c.function.name, "arguments": c.arguments()}}
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        turn["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        turn["name"] = m.name
    return turn


def _described(messages: list[ChatMessage], tools: list[Tool] | None, fmt: CallFormat) -> list[dict[str, Any]]:
    """The conversation for a template that knows no tools: tools described in the system turn, calls written
    out, tool results as user turns."""
    turns: list[dict[str, Any]] = []
    from_tool = False
    for m in messages:
        role = {"developer": "system", "tool": "user"}.get(m.role, m.role)
        content = m.text()
        if m.role == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
        if m.tool_calls:
            calls = "\n".join(fmt.write(c.function.name, c.arguments()) for c in m.tool_calls)
            content = f"{content}\n{calls}" if content else calls
        if turns and turns[-1]["role"] == role == "user" and (from_tool or m.role == "tool"):
            turns[-1]["content"] += "\n" + content
        else:
            turns.append({"role": role, "content": content})
        from_tool = m.role == "tool"
    if tools:
        functions = "\n".join(json.dumps(t.function.model_dump(exclude_none=True), ensure_ascii=False) for t in tools)
        preamble = TOOLS_PREAMBLE.format(functions=functions)
        if turns and turns[0]["role"] == "system":
            turns[0]["content"] = f"{turns[0]['content']}\n\n{preamble}"
        else:
            turns.insert(0, {"role": "system", "content": preamble})
    return turns


# -- the grammar --------------------------------------------------------------------------------------------------


def call_grammar(p: ToolPlan, alternative: dict | None = None) -> str | None:
    """Lark text for llguidance: calls only (required / named), or calls or a JSON reply following the
    `alternative` schema (auto with response_format). None: the model writes what it likes."""
    if not p.forced and alternative is None:
        return None
    fmt = p.template.format
    by_name = {t.function.name: t for t in p.tools}
    schema = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": name}, fmt.args_key: by_name[name].function.parameters_schema()},
                "required": ["name", fmt.args_key],
                "additionalProperties": False,
            }
            for name in p.names()
        ],
        "x-guidance": {"whitespace_pattern": JSON_WHITESPACE},
    }
    q = json.dumps
    call = f"{q(fmt.open + chr(10))} body {q(chr(10) + fmt.close)}" if fmt.open else "body"
    more = f" ({q(fmt.separator)} call){{0,{MAX_CALLS - 1}}}" if p.parallel else ""
    rules = [f"calls: call{more}", f"call: {call}", f"body: %json {q(schema)}"]
    if alternative is None:
        return "\n".join(["start: calls", *rules]) + "\n"
    reply = {**alternative, "x-guidance": {"whitespace_pattern": JSON_WHITESPACE}}
    return "\n".join(["start: calls | reply", *rules, f"reply: %json {q(reply)}"]) + "\n"


def stop_after_call(p: ToolPlan) -> list[str]:
    """Stop strings that end a reply after its one call when parallel calls are off."""
    fmt = p.template.format
    return [fmt.close] if not p.parallel and fmt.close else []


# -- the reply ----------------------------------------------------------------------------------------------------


def new_call(name: str, arguments: str) -> dict:
    call_id = f"call_{uuid.uuid4().hex[:24]}"
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


class CallParser:
    """One choice's text, fed as it grows -> content and tool calls. `feed` returns what is new since the last
    call: content that can no longer be part of a call, and the calls completed."""

    def __init__(self, p: ToolPlan) -> None:
        self.format = p.template.format
        self.single = not p.parallel
        self.calls: list[dict] = []
        self._at = 0
        self._open_at: int | None = None
        """Where the call being read began (its opening tag)."""

    def feed(self, text: str, final: bool) -> tuple[str, list[dict]]:
        before = len(self.calls)
        content = self._tagged(text, final) if self.format.open else self._whole(text, final)
        return content, self.calls[before:]

    def _tagged(self, text: str, final: bool) -> str:
        fmt, pieces = self.format, []
        while True:
            if self._open_at is None:
                i = text.find(fmt.open, self._at)
                if i < 0:
                    end = len(text) if final else len(text) - _held(text, self._at, fmt.open)
                    pieces.append(text[self._at : end])
                    self._at = end
                    break
                pieces.append(text[self._at : i])
                self._open_at, self._at = i, i + len(fmt.open)
                continue
            j = text.find(fmt.close, self._at)
            if j < 0 and not final:
                break
            end = j if j >= 0 else len(text)
            call = self._call(text[self._at : end])
            after = end + len(fmt.close) if j >= 0 else end
            if call is None or (self.single and self.calls):
                pieces.append(text[self._open_at : after] if call is None else "")
            else:
                self.calls.append(call)
            self._open_at, self._at = None, after
            if j < 0:
                break
        content = "".join(pieces)
        return content if not self.calls or content.strip() else ""

    def _whole(self, text: str, final: bool) -> str:
        """The llama3_json format: a reply that begins with '{' is held to its end, then read as calls."""
        if self._at == 0 and (text.lstrip().startswith("{") or not text.strip()):
            if not final:
                return ""
            calls = [self._call(part) for part in _split_objects(text)]
            if calls and all(c is not None for c in calls):
                self.calls += [c for c in calls if c is not None][: 1 if self.single else None]
                self._at = len(text)
                return ""
        content = text[self._at :]
        self._at = len(text)
        return content

    def _call(self, body: str) -> dict | None:
        try:
            obj = json.loads(body)
        except ValueError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get(self.format.args_key, obj.get("arguments", obj.get("parameters", {})))
        if not isinstance(args, dict):
            return None
        return new_call(obj["name"], json.dumps(args, ensure_ascii=False))


def _held(text: str, start: int, tag: str) -> int:
    """How many characters at the end of `text` could be the start of `tag`."""
    for k in range(min(len(tag) - 1, len(text) - start), 0, -1):
        if text.endswith(tag[:k]):
            return k
    return 0


def _split_objects(text: str) -> list[str]:
    """The JSON objects of 'OBJ; OBJ; ...' as texts ([] when the text is not that)."""
    decoder, parts, at = json.JSONDecoder(), [], 0
    text = text.strip()
    while at < len(text):
        try:
            _, end = decoder.raw_decode(text, at)
        except ValueError:
            return []
        parts.append(text[at:end])
        at = end
        while at < len(text) and text[at] in " \n;":
            at += 1
    return parts
