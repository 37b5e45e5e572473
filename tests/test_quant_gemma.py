"""Gemma 3 270M quantized at load: its next-token choices agree with the float model's along the float model's
own greedy continuations (teacher-forced, so one early disagreement does not decide the rest)."""

import pytest
import torch

from tokenfab import LLM, SamplingParams
from tokenfab.evaluation.scoring import window_hidden

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "def fibonacci(n):\n    ", "Once upon a time, in a small village by the sea,",
           "Water boils at a temperature of"]
NEW_TOKENS = 16
# tokenfab eval on the shipped corpus measured 95 % (int8), 89 % (fp8), 61 % (int4), 70 % (nvfp4) agreement.
MIN_AGREEMENT = {"int8": 0.9, "fp8": 0.8, "int4": 0.5, "nvfp4": 0.5}


def argmax_along(llm, sequences):
    model = llm.engine.core.model
    with torch.inference_mode():
        return [model.compute_logits(window_hidden(model, ids)).argmax(-1) for ids in sequences]


@pytest.fixture(scope="module")
def reference():
    llm = LLM(dtype="float32", max_model_len=256, kv_cache_memory_gb=0.1)
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    outs = llm.generate(prompts, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    sequences = [p + o.outputs[0].token_ids for p, o in zip(prompts, outs)]
    return prompts, sequences, argmax_along(llm, sequences)


@pytest.mark.parametrize("fmt", list(MIN_AGREEMENT))
def test_greedy_agreement_with_the_float_model(fmt, reference):
    prompts, sequences, expected = reference
    got = argmax_along(LLM(dtype="float32", max_model_len=256, kv_cache_memory_gb=0.1, quantization=fmt), sequences)
    same = total = 0
    for prompt, e, g in zip(prompts, expected, got):
        scored = slice(len(prompt) - 1, len(prompt) - 1 + NEW_TOKENS)  # predictions of the generated tokens
        same += int((e[scored] == g[scored]).sum())
        total += NEW_TOKENS
    assert same / total >= MIN_AGREEMENT[fmt], (fmt, same / total)
