"""Speculative decoding on the real default model (Gemma 3 270M): greedy tokens equal the engine without
speculation, with n-gram lookup on copy-heavy prompts (one past the 512-token sliding window) and with a draft
model (the model drafting for itself, so every draft is right and the text still must not change)."""

from __future__ import annotations

import pytest

from tokenfab import LLM, SamplingParams
from tokenfab.loader.default_model import default_model_dir

pytestmark = pytest.mark.slow

CODE = ("def moving_average(values, window):\n    if window <= 0:\n        raise ValueError('window must be positive')\n"
        "    out = []\n    total = 0.0\n    for i, v in enumerate(values):\n        total += v\n"
        "        if i >= window:\n            total -= values[i - window]\n"
        "        if i >= window - 1:\n            out.append(total / window)\n    return out\n")
READINGS = "\n".join(f"station {i}: temperature {10 + i % 7} C, wind {3 + i % 5} m/s, sky {['clear', 'cloudy'][i % 2]}"
                     for i in range(36))
COPY = [f"Repeat the following code exactly.\n\nCode:\n{CODE}\nRepeated code:\n",
        f"Tool output:\n{READINGS}\n\nAssistant: The tool returned these readings:\nstation 0:",
        "The capital of France is"]
NEW = 24
OPTS = dict(dtype="float32", max_model_len=2048, max_num_batched_tokens=256, kv_cache_memory_gb=0.3)
GREEDY = SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def expected():
    return [o.outputs[0].token_ids for o in LLM(**OPTS).generate(COPY, GREEDY)]


def test_ngram_greedy_equals_plain_decoding(expected):
    llm = LLM(**OPTS, speculative="ngram")
    assert len(llm.tokenizer.encode(COPY[1])) > 512  # past the sliding window
    assert [o.outputs[0].token_ids for o in llm.generate(COPY, GREEDY)] == expected
    assert llm.generate(COPY[0], GREEDY)[0].outputs[0].token_ids == expected[0]  # alone: pure decode with drafts
    stats = llm.engine.core.stats()
    assert stats.spec.accepted_tokens > 0.7 * stats.spec.proposed_tokens > 0
    assert stats.spec.accepted_tokens > NEW  # copying: most of the code was accepted from drafts
    llm.engine.core.kv.check_integrity()


def test_draft_model_greedy_equals_plain_decoding(expected):
    llm = LLM(**OPTS, speculative={"method": "draft", "draft_model": str(default_model_dir()),
                                   "num_speculative_tokens": 3, "adaptive": False})
    short = [COPY[0], COPY[2]]
    assert [o.outputs[0].token_ids for o in llm.generate(short, GREEDY)] == [expected[0], expected[2]]
    stats = llm.engine.core.stats()
    assert stats.spec.accepted_tokens == stats.spec.proposed_tokens > NEW
    llm.engine.core.kv.check_integrity()
    llm.engine.core.speculator.proposer.kv.check_integrity()
