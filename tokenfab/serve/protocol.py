"""OpenAI request and response schemas (pydantic), with the extensions tokenfab implements.

Every field declared here is implemented; anything else in a request is rejected with a 400 naming it
(`extra="forbid"`). Ranges follow OpenAI's where it states them. As in OpenAI's API, `null` for an optional field
means its default. Text must be valid Unicode (an unpaired surrogate is a 400 naming the field), and every list a
request can carry is bounded, so one request's validation and tokenization stay small.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    model_validator,
)

from tokenfab.engine.types import MAX_KEEP_KV_S

MAX_N = 16
MAX_STOP = 16
MAX_STOP_CHARS = 512
MAX_STOP_TOKEN_IDS = 256
MAX_PROMPTS = 128
"""Prompts in one completions request; each counts as a request (times n) for admission."""
MAX_MESSAGES = 8192
MAX_METADATA = 16
MAX_TOOLS = 128
INT32 = 2**31 - 1


def _encodable(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(
            f"the text has an unpaired surrogate (U+{ord(text[e.start]):04X}) at character {e.start}; "
            "send valid Unicode"
        ) from None
    return text


Text = Annotated[StrictStr, AfterValidator(_encodable)]
"""A string that is valid Unicode (JSON can carry lone surrogates; no tokenizer can)."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="before")
    @classmethod
    def _null_is_default(cls, data: Any) -> Any:
        """OpenAI's clients send `null` for fields they leave unset (`"stream": null`, `"n": null`)."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


NonEmpty = Annotated[Text, Field(min_length=1, max_length=MAX_STOP_CHARS)]


class StreamOptions(Strict):
    include_usage: StrictBool = False
    """Send a last chunk (empty choices) carrying the usage of the whole request."""


class SessionOptions(Strict):
    """Extension: the request is a turn of an agent session whose next turn will come back after a pause."""

    id: Annotated[Text, Field(min_length=1, max_length=256)]
    """The session's name (written to the request log, so a session's cost can be summed)."""
    ttl_s: Annotated[StrictFloat | StrictInt, Field(gt=0, le=MAX_KEEP_KV_S)]
    """Seconds this turn's KV blocks stay in the engine's pool after it finishes (unless the pool needs them for
    work it would otherwise refuse; with a host tier they then move there)."""


class SamplingFields(Strict):
    """Parameters shared by completions and chat completions."""

    model: Text | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: (
        Annotated[Text, Field(max_length=MAX_STOP_CHARS)] | Annotated[list[NonEmpty], Field(max_length=MAX_STOP)] | None
    ) = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    presence_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    user: Annotated[Text, Field(max_length=256)] | None = None
    """End-user id: written with the request's cost to the request log (--request-log); not used for sampling."""
    store: Literal[False] = False
    """Accepted as OpenAI's default (nothing is stored); `true` is refused: there is no stored-completions API."""
    metadata: (
        Annotated[
            dict[Annotated[Text, Field(max_length=64)], Annotated[Text, Field(max_length=512)]],
            Field(max_length=MAX_METADATA),
        ]
        | None
    ) = None
    """Accepted and ignored: OpenAI attaches it to stored completions, and nothing is stored."""
    service_tier: Literal["auto", "default"] = "auto"
    """Accepted: this server has one tier. Other tiers ("flex", "priority", "scale") are refused."""
    no_stop_trim: Literal[False] = False
    """Accepted as SGLang's default (stop strings are cut from the text; sglang-router sends it on every request);
    `true` is refused."""
    return_hidden_states: Literal[False] = False
    """Accepted as SGLang's default (sglang-router sends it on every request); `true` is refused."""
    # Extensions (as in vLLM's OpenAI server).
    top_k: Annotated[StrictInt, Field(ge=-1, le=INT32)] | None = None
    min_p: Annotated[StrictFloat, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[StrictFloat, Field(gt=0.0, le=10.0)] | None = None
    ignore_eos: StrictBool = False
    min_tokens: Annotated[StrictInt, Field(ge=0, le=INT32)] = 0
    stop_token_ids: (
        Annotated[list[Annotated[StrictInt, Field(ge=0, le=INT32)]], Field(max_length=MAX_STOP_TOKEN_IDS)] | None
    ) = None
    skip_special_tokens: StrictBool = True
    priority: Annotated[StrictInt, Field(ge=-INT32, le=INT32)] = 0
    """Lower is served first (FCFS among equals)."""
    session: SessionOptions | None = None
    """Extension: keep this turn's KV for the session's next turn (`SessionOptions`)."""
    guided_regex: Annotated[Text, Field(min_length=1, max_length=4096)] | None = None
    """Extension (as vLLM's): every completion matches this regular expression, then ends."""
    guided_json: dict[str, Any] | Annotated[Text, Field(min_length=1, max_length=1 << 20)] | None = None
    """Extension (as vLLM's): every completion is JSON following this schema (an object, or one in a string)."""
    guided_choice: (
        Annotated[list[Annotated[Text, Field(max_length=4096)]], Field(min_length=1, max_length=1024)] | None
    ) = None
    """Extension (as vLLM's): every completion is one of these strings."""
    guided_grammar: Annotated[Text, Field(min_length=1, max_length=1 << 20)] | None = None
    """Extension (as vLLM's): every completion follows this context-free grammar (Lark, as llguidance reads it, or
    GBNF as llama.cpp's)."""

    def guides(self) -> list[str]:
        """The guided_* fields the request sets."""
        names = ("guided_regex", "guided_json", "guided_choice", "guided_grammar")
        return [name for name in names if getattr(self, name) is not None]


TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0, le=INT32)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: (
        Text
        | Annotated[list[Text], Field(min_length=1, max_length=MAX_PROMPTS)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)]
    )
    max_tokens: Annotated[StrictInt, Field(ge=0, le=INT32)] | None = 16
    """0 only with echo: the prompt alone, scored (with logprobs), as evaluation harnesses ask."""
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    """With echo, the prompt's tokens are scored too (from the prefill that runs anyway)."""
    echo: StrictBool = False
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None
    """Only best_of == n is supported (no server-side ranking)."""


class TextPart(Strict):
    type: Literal["text"]
    text: Text


ToolName = Annotated[StrictStr, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]


class FunctionCall(Strict):
    name: ToolName
    arguments: Annotated[Text, Field(max_length=1 << 20)]
    """The arguments as a JSON object, in a string (as the model wrote them)."""


class ToolCall(Strict):
    id: Annotated[Text, Field(min_length=1, max_length=256)]
    type: Literal["function"] = "function"
    function: FunctionCall

    def arguments(self) -> dict[str, Any]:
        return json.loads(self.function.arguments)

    @model_validator(mode="after")
    def _arguments_are_an_object(self) -> ToolCall:
        try:
            ok = isinstance(json.loads(self.function.arguments), dict)
        except ValueError:
            ok = False
        if not ok:
            raise ValueError("function.arguments must be a JSON object in a string")
        return self


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Text | Annotated[list[TextPart], Field(max_length=MAX_MESSAGES)] | None = None
    name: Annotated[Text, Field(max_length=256)] | None = None
    tool_calls: Annotated[list[ToolCall], Field(max_length=MAX_TOOLS)] | None = None
    """An assistant turn's calls (content may then be null)."""
    tool_call_id: Annotated[Text, Field(min_length=1, max_length=256)] | None = None
    """A tool turn's answer to that call."""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""

    @model_validator(mode="after")
    def _tool_fields_fit_the_role(self) -> ChatMessage:
        if self.tool_calls is not None and self.role != "assistant":
            raise ValueError("only assistant messages carry tool_calls")
        if (self.tool_call_id is not None) != (self.role == "tool"):
            raise ValueError("a tool message needs tool_call_id, and only a tool message has one")
        return self


class FunctionDef(Strict):
    name: ToolName
    description: Annotated[Text, Field(max_length=8192)] | None = None
    parameters: dict[str, Any] | None = None
    """A JSON schema for the arguments object (omitted: no arguments)."""
    strict: StrictBool | None = None
    """Accepted either way: forced calls always follow the schema; `auto` calls are parsed, not forced."""

    def parameters_schema(self) -> dict[str, Any]:
        return self.parameters if self.parameters is not None else {"type": "object", "properties": {}}


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDef


class FunctionName(Strict):
    name: ToolName


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: FunctionName


class JsonSchemaFormat(Strict):
    name: Annotated[Text, Field(min_length=1, max_length=64)]
    description: Text | None = None
    schema_: dict[str, Any] = Field(default_factory=dict, alias="schema")
    """The JSON schema every completion follows (llguidance's JSON subset; an unsupported keyword is a 400)."""
    strict: StrictBool | None = None
    """Accepted either way: the output always follows the schema."""


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    """text (no constraint), json_object (any JSON object) or json_schema (follows `json_schema.schema`)."""
    json_schema: JsonSchemaFormat | None = None


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    response_format: ResponseFormat | None = None
    """Structured output: every choice follows the format (generated under its grammar), ending with EOS."""
    max_tokens: Annotated[StrictInt, Field(ge=1, le=INT32)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=INT32)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    add_generation_prompt: StrictBool = True
    """Extension: end the rendered conversation with the assistant's turn header."""
    tools: Annotated[list[Tool], Field(min_length=1, max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    """none (reply in text), auto (default with tools: the model decides), required (at least one call) or a
    named function (exactly that one); required and named calls are generated under a grammar, so they parse."""
    parallel_tool_calls: StrictBool = True
    """False: at most one call per reply."""


class TokenizeRequest(Strict):
    model: Text | None = None
    prompt: Text | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    """With messages: the tools, rendered as a chat request's are."""
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(Strict):
    model: Text | None = None
    tokens: list[Annotated[StrictInt, Field(ge=0, le=INT32)]]


# -- responses ----------------------------------------------------------------------------------------------------


class Cost(BaseModel):
    usd: float
    """Device time at the catalogue's price plus energy at the electricity price."""
    joules: float
    device_seconds: float
    """This request's share of engine step time (steps are shared by the requests batched in them)."""
    energy_source: Literal["measured", "modelled"]


class PromptTokensDetails(BaseModel):
    cached_tokens: int


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None
    cost: Cost | None = None


class CompletionLogprobs(BaseModel):
    tokens: list[str]
    token_logprobs: list[float | None]
    """None for an echoed prompt's first token (nothing precedes it)."""
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: int | str | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    tool_calls: list[ToolCall] | None = None


class ChatChoice(BaseModel):
    """A whole response's choice (streamed chunks carry `delta` instead of `message`)."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort", "tool_calls"] | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "tokenfab"
    max_model_len: int
    quantization: str = "none"
    """Weight formats of the linear layers."""
    weight_bytes: int = 0
    """Weight bytes one decode step reads."""
    kernel_isa: str = "torch"
    """ISA level of tokenfab's CPU kernels (avx2, avx2_vnni, avx512, avx512_vnni), or torch where none runs."""
    kernel_isa_reason: str = ""
    """Why that level (the best the CPU has, TOKENFAB_CPU_ISA, or why the kernels cannot run)."""
    cpu_flags: list[str] = []
    """The CPU's vector-extension flags."""
    batch_invariant: bool = False
    block_size: int = 16
    """Tokens per KV block: a router hashing prompts (tokenfab.engine.block_hash) needs it."""
    kv_events_endpoint: str | None = None
    """Where the engine publishes KV events (the bound address), if it does."""
    kv_events_replay_endpoint: str | None = None
    """Whether a request's tokens are independent of the batch it runs in."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizerInfo(BaseModel):
    """The tokenizer's configuration (as vLLM's /tokenizer_info): what a client tokenizing remotely needs."""

    tokenizer_class: str = "PreTrainedTokenizerFast"
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    add_bos_token: bool
    chat_template: str | None
    model_max_length: int
    vocab_size: int


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
