"""LLMEngine: the in-process engine — tokenizer and OutputProcessor in front of an EngineCore, one step at a time.

The API server runs the same two halves in two processes (`tokenfab.serve`); offline use keeps them together.
"""

from __future__ import annotations

import itertools
import time

from tokenfab.config import EngineConfig
from tokenfab.engine.core import EngineCore
from tokenfab.engine.output_processor import OutputProcessor
from tokenfab.engine.stats import EngineStats
from tokenfab.engine.types import RequestOutput, SamplingParams
from tokenfab.models.loading import load_tokenizer


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.core = EngineCore(config)
        self.tokenizer = load_tokenizer(self.core.source)
        self.outputs = OutputProcessor(self.tokenizer)
        self._ids = itertools.count()

    def add_request(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None, priority: int = 0
    ) -> str:
        request_id = request_id or f"req-{next(self._ids)}"
        core_requests = self.outputs.add_prompt(request_id, prompt, params, time.monotonic(), priority)
        try:
            for core_request in core_requests:
                self.core.add_request(core_request)  # validates the prompt
        except ValueError:
            self.abort_request(request_id)
            raise
        return request_id

    def abort_request(self, request_id: str) -> None:
        self.core.abort(self.outputs.child_ids(request_id))
        self.outputs.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        return self.core.has_unfinished()

    def stats(self) -> EngineStats:
        return self.core.stats()

    def step(self) -> list[RequestOutput]:
        outputs, stopped = self.outputs.process(self.core.step(), time.monotonic())
        self.core.abort(stopped)
        return outputs
