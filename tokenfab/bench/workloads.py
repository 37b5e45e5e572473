"""Workloads: what requests a benchmark sends — random ISL/OSL, shared prefixes, agentic sessions, chat-like
lengths, or a replayed trace. Prompts are real token sequences of the target tokenizer, sent as text.

Every workload is deterministic in its seed. An agentic session is a chain: each turn's prompt is the previous
prompt, the model's reply and a new tool output, so it is built while the run goes (`SessionSpec`).
"""

from __future__ import annotations

import json
import random as _random
from dataclasses import dataclass, field
from pathlib import Path

from tokenfab.tokenizer import Tokenizer


@dataclass(frozen=True, slots=True)
class RequestSpec:
    prompt: str
    prompt_tokens: int
    max_tokens: int
    arrival: float | None = None
    """Seconds after the run's start (trace replay); None lets the load generator decide."""
    session: str | None = None
    sampling: dict | None = None
    """Extra request fields such as temperature, top_p and seed; None sends greedy requests."""


@dataclass(frozen=True, slots=True)
class SessionSpec:
    """A multi-turn agentic session: a system prompt, then turns of (tool output, reply length)."""

    session: str
    system: str
    tool_outputs: list[str] = field(default_factory=list)
    reply_tokens: list[int] = field(default_factory=list)
    think_time_s: float = 0.0


class TextSampler:
    """Random text whose tokenization has (close to) a wanted length: decode random ordinary tokens, re-encode,
    trim. Ordinary = tokens that decode to a plain word piece (no control or byte tokens)."""

    def __init__(self, tokenizer: Tokenizer, seed: int) -> None:
        self.tokenizer = tokenizer
        self.rng = _random.Random(seed)
        vocab = tokenizer.inner.get_vocab()
        self._pool = sorted(i for t, i in vocab.items() if _ordinary(t))
        if len(self._pool) < 16:
            raise ValueError("the tokenizer has too few ordinary tokens to build prompts from")

    def text(self, tokens: int) -> tuple[str, int]:
        ids = [self.rng.choice(self._pool) for _ in range(max(1, tokens))]
        text = self.tokenizer.decode(ids)
        encoded = self.tokenizer.encode(text, add_special_tokens=False)
        if len(encoded) > tokens:
            text = self.tokenizer.decode(encoded[:tokens])
            encoded = self.tokenizer.encode(text, add_special_tokens=False)
        return text, len(encoded)


def _ordinary(token: str) -> bool:
    word = token.lstrip("▁Ġ ")
    return word.isalnum() and word.isascii() and any(c.isalpha() for c in word) and 2 <= len(word) <= 12


def uniform_length(rng: _random.Random, length: int) -> int:
    """Lengths uniform in [0.8 L, L], as in BENCHMARKS.md."""
    return rng.randint(max(1, int(0.8 * length)), length)


def random_workload(tokenizer: Tokenizer, isl: int, osl: int, n: int, seed: int = 0) -> list[RequestSpec]:
    sampler = TextSampler(tokenizer, seed)
    specs = []
    for _ in range(n):
        text, count = sampler.text(uniform_length(sampler.rng, isl))
        specs.append(RequestSpec(text, count, uniform_length(sampler.rng, osl)))
    return specs


def prefix_workload(
    tokenizer: Tokenizer, num_prefixes: int, prefix_len: int, suffix_len: int, osl: int, n: int, seed: int = 0
) -> list[RequestSpec]:
    """K shared prefixes of P tokens, each request one of them plus a unique suffix (round robin)."""
    sampler = TextSampler(tokenizer, seed)
    prefixes = [sampler.text(prefix_len) for _ in range(num_prefixes)]
    specs = []
    for i in range(n):
        prefix, p_count = prefixes[i % num_prefixes]
        suffix, s_count = sampler.text(uniform_length(sampler.rng, suffix_len))
        specs.append(
            RequestSpec(
                prefix + " " + suffix,
                p_count + s_count,
                uniform_length(sampler.rng, osl),
                session=f"prefix-{i % num_prefixes}",
            )
        )
    return specs


def chat_workload(
    tokenizer: Tokenizer,
    n: int,
    seed: int = 0,
    mean_in: int = 256,
    mean_out: int = 192,
    max_in: int = 2048,
    max_out: int = 1024,
) -> list[RequestSpec]:
    """Chat-like lengths: log-normal input and output lengths (long-tailed, as in conversation datasets)."""
    sampler = TextSampler(tokenizer, seed)
    rng = sampler.rng
    specs = []
    for _ in range(n):
        isl = min(max_in, max(4, int(rng.lognormvariate(_mu(mean_in, 0.8), 0.8))))
        osl = min(max_out, max(1, int(rng.lognormvariate(_mu(mean_out, 0.7), 0.7))))
        text, count = sampler.text(isl)
        specs.append(RequestSpec(text, count, osl))
    return specs


def _mu(mean: float, sigma: float) -> float:
    import math

    return math.log(mean) - sigma * sigma / 2


def agentic_sessions(
    tokenizer: Tokenizer,
    sessions: int,
    turns: int,
    system_len: int,
    tool_len: int,
    reply_len: int,
    think_time_s: float,
    seed: int = 0,
) -> list[SessionSpec]:
    sampler = TextSampler(tokenizer, seed)
    specs = []
    for s in range(sessions):
        system, _ = sampler.text(system_len)
        tools = [sampler.text(uniform_length(sampler.rng, tool_len))[0] for _ in range(turns)]
        replies = [uniform_length(sampler.rng, reply_len) for _ in range(turns)]
        specs.append(SessionSpec(f"session-{s}", system, tools, replies, think_time_s))
    return specs


def trace_workload(path: str | Path, tokenizer: Tokenizer, seed: int = 0) -> list[RequestSpec]:
    """JSONL lines {"timestamp": s, "input": text | "input_length": n, "output_length": n, "session_id": id}."""
    sampler = TextSampler(tokenizer, seed)
    specs = []
    start: float | None = None
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ts = float(row["timestamp"])
            out = int(row["output_length"])
            if "input" in row:
                text = str(row["input"])
                count = len(tokenizer.encode(text, add_special_tokens=False))
            else:
                text, count = sampler.text(int(row["input_length"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path}:{number}: bad trace line ({e}); want timestamp, input or input_length, output_length"
            ) from None
        start = ts if start is None else start
        specs.append(RequestSpec(text, count, max(1, out), arrival=ts - start, session=row.get("session_id")))
    if not specs:
        raise ValueError(f"{path}: the trace is empty")
    return specs
