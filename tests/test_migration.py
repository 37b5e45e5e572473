"""A sequence resumed from its prompt + the tokens it already generated (what a router sends another replica when
one is lost) continues exactly as if it had never moved: greedy, seeded sampling, penalties, a grammar, n-gram
speculation — whatever the cut (a grammar's state: tests/test_structured_output.py, on the real model)."""

from __future__ import annotations

import time

import pytest

from tokenfab.config import EngineConfig, SpeculativeConfig
from tokenfab.engine.core import EngineCore
from tokenfab.engine.messages import CoreRequest
from tokenfab.engine.types import SamplingParams

NEW = 24


def generate(core: EngineCore, rid: str, prompt: list[int], params: SamplingParams, done: list[int]) -> list[int]:
    core.add_request(CoreRequest(rid, prompt, params, time.monotonic(), output_token_ids=done))
    tokens: list[int] = []
    finished = False
    while not finished:
        for out in core.step():
            assert out.request_id == rid and out.error is None, out
            tokens += out.new_token_ids
            finished = out.finish_reason is not None
    return tokens


@pytest.fixture(scope="module", params=["none", "ngram"])
def core(request, tiny_model):
    config = EngineConfig(model=str(tiny_model("llama")), dtype="float32", num_threads=1, kv_cache_memory_gb=0.02,
                          max_model_len=256, speculative=SpeculativeConfig(request.param, adaptive=False))
    return EngineCore(config)


CASES = {
    "greedy": SamplingParams(max_tokens=NEW, temperature=0, ignore_eos=True),
    "seeded": SamplingParams(max_tokens=NEW, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True),
    "penalties": SamplingParams(max_tokens=NEW, temperature=0.7, seed=5, frequency_penalty=0.8,
                                repetition_penalty=1.3, ignore_eos=True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_resumed_sequence_continues_as_if_it_never_moved(core, case):
    params = CASES[case]
    prompt = [5, 17, 29, 41, 53, 17, 29, 41, 53, 17, 29]  # repeats: n-gram drafts find matches
    whole = generate(core, f"{case}-whole", prompt, params, [])
    assert len(whole) == NEW
    for cut in (1, len(whole) // 2, len(whole) - 1):
        rest = generate(core, f"{case}-from-{cut}", prompt, params, whole[:cut])
        assert whole[:cut] + rest == whole, (case, cut)
    assert core.stats().kv.free_blocks == core.stats().kv.total_blocks  # nothing held after they finish


def test_a_resumed_sequence_is_checked_like_a_prompt(core):
    with pytest.raises(ValueError, match="maximum context length"):
        core.add_request(CoreRequest("long", [5] * 200, CASES["greedy"], time.monotonic(), output_token_ids=[6] * 60))
