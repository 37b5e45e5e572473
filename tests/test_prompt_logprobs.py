"""Prompt logprobs from the prefill that already runs: equal to transformers' log-softmax of the same prompt at
every position, through chunked prefill, with the prompt already in the prefix cache, for n > 1, and beside
requests that did not ask (whose tokens do not change)."""

from __future__ import annotations

import pytest
import torch

from conftest import random_prompts, tiny_llm
from tokenfab import SamplingParams

K = 3


@pytest.fixture(scope="module")
def path(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def llm(path):
    # fp32 (compared with transformers in fp32); a 16-token budget splits the longer prompts into prefill chunks.
    return tiny_llm(path, max_num_batched_tokens=16)


def reference(model, prompt: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)


def check(lps, prompt: list[int], ref: torch.Tensor) -> None:
    assert lps is not None and len(lps) == len(prompt) - 1
    for p, lp in enumerate(lps):
        target = prompt[p + 1]
        assert lp.token_id == target
        assert lp.logprob == pytest.approx(float(ref[p, target]), abs=2e-4)
        assert lp.rank == int((ref[p] > ref[p, target]).sum()) + 1
        values, ids = ref[p].topk(K)
        assert [t for t, _ in lp.top] == ids.tolist()
        assert [v for _, v in lp.top] == pytest.approx(values.tolist(), abs=2e-4)


def test_prompt_logprobs_equal_transformers_through_chunks_and_cache(llm, path, hf_model):
    prompts = random_prompts([45, 9, 2, 1], seed=11)
    params = SamplingParams(max_tokens=2, temperature=0, ignore_eos=True, prompt_logprobs=K)
    first = llm.generate(prompts, params)
    again = llm.generate(prompts, params)  # the prompts' blocks are cached now: still every position
    model = hf_model(path)
    for prompt, a, b in zip(prompts, first, again):
        check(a.prompt_logprobs, prompt, reference(model, prompt))
        assert b.prompt_logprobs == a.prompt_logprobs
        assert a.outputs[0].token_ids == b.outputs[0].token_ids


def test_prompt_logprobs_beside_other_requests_and_with_siblings(llm, path, hf_model):
    prompts = random_prompts([30, 20, 12], seed=12)
    greedy = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    alone = [llm.generate([p], greedy)[0].outputs[0].token_ids for p in prompts]
    asked = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True, prompt_logprobs=0)
    mixed = llm.generate(prompts, [asked, greedy, asked])
    assert [o.outputs[0].token_ids for o in mixed] == alone  # asking changes nothing else
    assert mixed[1].prompt_logprobs is None
    model = hf_model(path)
    for i in (0, 2):
        ref = reference(model, prompts[i])
        assert [lp.token_id for lp in mixed[i].prompt_logprobs] == prompts[i][1:]
        assert [lp.top for lp in mixed[i].prompt_logprobs] == [[]] * (len(prompts[i]) - 1)
        for p, lp in enumerate(mixed[i].prompt_logprobs):
            assert lp.logprob == pytest.approx(float(ref[p, prompts[i][p + 1]]), abs=2e-4)
    n3 = llm.generate([prompts[0]], SamplingParams(n=3, max_tokens=4, temperature=1.0, seed=5, prompt_logprobs=1))[0]
    assert len(n3.outputs) == 3 and len(n3.prompt_logprobs) == len(prompts[0]) - 1
    check_tokens = [lp.token_id for lp in n3.prompt_logprobs]
    assert check_tokens == prompts[0][1:]
