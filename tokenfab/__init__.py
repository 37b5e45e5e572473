"""tokenfab: LLM inference built around cost per token."""

from tokenfab.config import EngineConfig
from tokenfab.engine.types import CompletionOutput, RequestOutput, SamplingParams
from tokenfab.llm import LLM

__all__ = ["LLM", "SamplingParams", "EngineConfig", "RequestOutput", "CompletionOutput"]
__version__ = "0.1.0"
