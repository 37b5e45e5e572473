"""The evaluation text and its windows.

The shipped corpus (data/corpus.txt, ~15 KB, ~3.4k Gemma tokens) mixes public-domain passages (speeches,
founding documents, pre-1900 literature in English, French and German, scripture) with expository prose and
Python code written for this project. Human-written text rather than text sampled from the float model: sampled
text is what that model finds likely, which flatters it and skews the KL of the quantized ones. Its size is what
the whole evaluation (reference + four formats) scores in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tokenfab.tokenizer import Tokenizer


def corpus_text(path: Path | None = None) -> str:
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    return resources.files("tokenfab.evaluation").joinpath("data/corpus.txt").read_text(encoding="utf-8")


def windows(tokenizer: Tokenizer, text: str, window: int, max_tokens: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of at most `window` tokens, each starting with BOS (when the model has one)
    followed by the next stretch of the text; every token after the first is scored."""
    body = tokenizer.encode(text, add_special_tokens=False)
    if max_tokens is not None:
        body = body[:max_tokens]
    bos = tokenizer.special.bos_token_id
    prefix = [bos] if bos is not None else []
    step = window - len(prefix)
    if step < 1:
        raise ValueError(f"window {window} is too short")
    chunks = [prefix + body[i : i + step] for i in range(0, len(body), step)]
    return [c for c in chunks if len(c) >= 2]
