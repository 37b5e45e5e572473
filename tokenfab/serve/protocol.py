"""OpenAI request and response schemas (pydantic), with the extensions tokenfab implements.

Every field declared here is implemented; anything else in a request is rejected with a 400 naming it
(`extra="forbid"`). Ranges follow OpenAI's where it states them.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

MAX_N = 16
MAX_STOP = 16
INT32 = 2**31 - 1


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


NonEmpty = Annotated[StrictStr, Field(min_length=1)]


class StreamOptions(Strict):
    include_usage: StrictBool = False
    """Send a last chunk (empty choices) carrying the usage of the whole request."""


class SamplingFields(Strict):
    """Parameters shared by completions and chat completions."""

    model: StrictStr | None = None
    n: Annotated[StrictInt, Field(ge=1, le=MAX_N)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    stop: StrictStr | Annotated[list[NonEmpty], Field(max_length=MAX_STOP)] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    temperature: Annotated[StrictFloat, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[StrictFloat, Field(gt=0.0, le=1.0)] | None = None
    presence_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    frequency_penalty: Annotated[StrictFloat, Field(ge=-2.0, le=2.0)] | None = None
    user: StrictStr | None = None
    """End-user id: written with the request's cost to the request log (--request-log); not used for sampling."""
    # Extensions (as in vLLM's OpenAI server).
    top_k: Annotated[StrictInt, Field(ge=-1, le=INT32)] | None = None
    min_p: Annotated[StrictFloat, Field(ge=0.0, le=1.0)] | None = None
    repetition_penalty: Annotated[StrictFloat, Field(gt=0.0, le=10.0)] | None = None
    ignore_eos: StrictBool = False
    min_tokens: Annotated[StrictInt, Field(ge=0, le=INT32)] = 0
    stop_token_ids: list[Annotated[StrictInt, Field(ge=0, le=INT32)]] | None = None
    skip_special_tokens: StrictBool = True
    priority: Annotated[StrictInt, Field(ge=-INT32, le=INT32)] = 0
    """Lower is served first (FCFS among equals)."""


TokenIds = Annotated[list[Annotated[StrictInt, Field(ge=0, le=INT32)]], Field(min_length=1)]


class CompletionRequest(SamplingFields):
    prompt: (
        StrictStr
        | Annotated[list[StrictStr], Field(min_length=1)]
        | TokenIds
        | Annotated[list[TokenIds], Field(min_length=1)]
    )
    max_tokens: Annotated[StrictInt, Field(ge=1, le=INT32)] | None = 16
    logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    echo: StrictBool = False
    best_of: Annotated[StrictInt, Field(ge=1, le=MAX_N)] | None = None
    """Only best_of == n is supported (no server-side ranking)."""


class TextPart(Strict):
    type: Literal["text"]
    text: StrictStr


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart] | None = None
    name: StrictStr | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: Annotated[StrictInt, Field(ge=1, le=INT32)] | None = None
    max_completion_tokens: Annotated[StrictInt, Field(ge=1, le=INT32)] | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[StrictInt, Field(ge=0, le=20)] | None = None
    add_generation_prompt: StrictBool = True
    """Extension: end the rendered conversation with the assistant's turn header."""


class TokenizeRequest(Strict):
    model: StrictStr | None = None
    prompt: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: StrictBool = True
    add_generation_prompt: StrictBool = True


class DetokenizeRequest(Strict):
    model: StrictStr | None = None
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
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
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


class ChatChoice(BaseModel):
    """A whole response's choice (streamed chunks carry `delta` instead of `message`)."""

    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
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
