"""Gemma 3 270M quantized at load: greedy continuations agree with the float model on most tokens."""

import pytest

from tokenfab import LLM, SamplingParams

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village by the sea,",
           "Water boils at a temperature of"]
NEW_TOKENS = 12
# Fraction of generated tokens equal to the float model's, position by position (a first divergence changes
# the rest): int8/fp8 keep ~all; 4-bit formats keep most on these prompts.
MIN_AGREEMENT = {"int8": 0.9, "fp8": 0.75, "int4": 0.5, "nvfp4": 0.5}


def greedy(llm):
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def float_tokens():
    return greedy(LLM(dtype="float32", max_model_len=256, kv_cache_memory_gb=0.1))


@pytest.mark.parametrize("fmt", list(MIN_AGREEMENT))
def test_greedy_agreement_with_the_float_model(fmt, float_tokens):
    llm = LLM(dtype="float32", max_model_len=256, kv_cache_memory_gb=0.1, quantization=fmt)
    got = greedy(llm)
    same = sum(a == b for ref, out in zip(float_tokens, got) for a, b in zip(ref, out))
    assert same / (len(PROMPTS) * NEW_TOKENS) >= MIN_AGREEMENT[fmt], (fmt, got, float_tokens)
    assert all(out[0] == ref[0] for ref, out in zip(float_tokens, got))  # the first token of each prompt
