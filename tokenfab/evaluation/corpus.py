"""The evaluation text (its windows: tokenfab.tokenizer.token_windows).

The shipped corpus (data/corpus.txt, ~15 KB, ~3.4k Gemma tokens) mixes public-domain passages (speeches,
founding documents, pre-1900 literature in English, French and German, scripture) with expository prose and
Python code written for this project. Human-written text rather than text sampled from the float model: sampled
text is what that model finds likely, which flatters it and skews the KL of the quantized ones. Its size is what
the whole evaluation (reference + four formats) scores in a few minutes on 2 CPU cores.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def corpus_text(path: Path | None = None) -> str:
    if path is not None:
        return Path(path).read_text(encoding="utf-8")
    return resources.files("tokenfab.evaluation").joinpath("data/corpus.txt").read_text(encoding="utf-8")
