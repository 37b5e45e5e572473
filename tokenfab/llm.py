"""LLM: the offline API — generate, chat and stream over one in-process engine (or data-parallel engine processes)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import fields
from typing import Any, cast

from tokenfab.cluster.offline import RouterEngine
from tokenfab.config import EngineConfig, SpeculativeConfig
from tokenfab.engine.engine import LLMEngine
from tokenfab.engine.types import RequestOutput, SamplingParams

Prompt = str | list[int]
Messages = list[dict[str, Any]]


class LLM:
    """`LLM()` serves the embedded default model; `LLM(model=path)` an HF directory or a .gguf file.

    `speculative` takes a SpeculativeConfig, its fields as a dict, or the command-line form ("ngram", "mtp",
    "draft:<model>").
    """

    def __init__(self, model: str | None = None, **engine_options: Any) -> None:
        known = {f.name for f in fields(EngineConfig)}
        unknown = sorted(set(engine_options) - known)
        if unknown:
            raise TypeError(f"unknown engine options: {', '.join(unknown)}")
        spec = engine_options.get("speculative")
        if isinstance(spec, str):
            engine_options["speculative"] = SpeculativeConfig.parse(spec)
        elif isinstance(spec, dict):
            engine_options["speculative"] = SpeculativeConfig(**spec)
        self.engine = _engine(EngineConfig(model=model, **engine_options))
        self.tokenizer = self.engine.tokenizer

    @classmethod
    def from_config(cls, config: EngineConfig) -> LLM:
        """An LLM over an engine built from a complete EngineConfig (what the command line produces)."""
        llm = cls.__new__(cls)
        llm.engine = _engine(config)
        llm.tokenizer = llm.engine.tokenizer
        return llm

    def close(self) -> None:
        """Stop the engine processes of a data-parallel LLM (at exit otherwise); an in-process engine needs none."""
        if isinstance(self.engine, RouterEngine):
            self.engine.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        batch = _as_batch(prompts)
        plist = _params_list(params, len(batch))
        ids = [
            self.engine.add_request(p, sp, priority=priority[i] if priority else 0)
            for i, (p, sp) in enumerate(zip(batch, plist))
        ]
        return self._run(ids)

    def chat(
        self, messages: Messages | Sequence[Messages], params: SamplingParams | Sequence[SamplingParams] | None = None
    ) -> list[RequestOutput]:
        conversations = cast(
            list[Messages], [messages] if messages and isinstance(messages[0], dict) else list(messages)
        )
        prompts = [self.tokenizer.encode_chat(c) for c in conversations]
        return self.generate(prompts, params)

    def stream(self, prompt: Prompt, params: SamplingParams | None = None) -> Iterator[RequestOutput]:
        """Yield the request's output after every step that changed it; the last one has finished=True."""
        request_id = self.engine.add_request(prompt, params or SamplingParams())
        try:
            while True:
                for out in self.engine.step():
                    if out.request_id == request_id:
                        yield out
                        if out.finished:
                            return
        finally:
            self.engine.abort_request(request_id)

    def _run(self, request_ids: list[str]) -> list[RequestOutput]:
        pending = set(request_ids)
        done: dict[str, RequestOutput] = {}
        while pending:
            for out in self.engine.step():
                if out.finished and out.request_id in pending:
                    done[out.request_id] = out
                    pending.discard(out.request_id)
        return [done[i] for i in request_ids]


def _engine(config: EngineConfig) -> LLMEngine | RouterEngine:
    """One in-process engine, or with data_parallel_size > 1 that many engine processes behind a router."""
    return RouterEngine(config) if config.data_parallel_size > 1 else LLMEngine(config)


def _as_batch(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    if isinstance(prompts, str):
        return [prompts]
    if prompts and isinstance(prompts[0], int):
        return [list(prompts)]  # type: ignore[arg-type]
    return list(prompts)  # type: ignore[arg-type]


def _params_list(params: SamplingParams | Sequence[SamplingParams] | None, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams() for _ in range(n)]
    if isinstance(params, SamplingParams):
        return [params] * n
    if len(params) != n:
        raise ValueError(f"{len(params)} sampling params for {n} prompts")
    return list(params)
