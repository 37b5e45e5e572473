"""Engine behaviour on tiny random-weight models: transformers equality, batching, caching, sampling, stops."""

import math

import pytest
import torch

from conftest import hf_greedy, random_prompts, tiny_llm
from tokenfab import LLM, SamplingParams

GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


make_llm = tiny_llm


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma3"])
def test_greedy_matches_transformers_in_a_chunked_batch(kind, tiny_model, hf_model):
    path = tiny_model(kind)
    prompts = random_prompts([5, 40, 100, 17, 70], seed=1)
    outs = make_llm(path).generate(prompts, GREEDY)
    hf = hf_model(path)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 16)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_logprobs_match_transformers(kind, tiny_model, hf_model):
    path = tiny_model(kind)
    prompt = random_prompts([60], seed=2)[0]
    out = make_llm(path).generate([prompt], SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0].outputs[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf_model(path)(torch.tensor([prompt])).logits[0, -1], -1)
    lp = out.logprobs[0]
    top_vals, top_ids = ref.topk(5)
    assert [t for t, _ in lp.top] == top_ids.tolist()
    assert max(abs(a - b) for (_, a), b in zip(lp.top, top_vals.tolist())) < 1e-4
    assert lp.rank == 1 and lp.token_id == top_ids[0]


@pytest.mark.parametrize("options", [{}, {"dtype": "bfloat16"}, {"quantization": "int8"}, {"quantization": "bf16-act"}],
                         ids=["fp32", "bf16", "int8", "bf16-act"])
def test_batch_invariance_of_greedy_and_seeded_requests(options, tiny_model):
    """A request alone and inside a 16-request mixed batch (its prefill chunked beside decodes): the same tokens
    and the same logprobs to the bit. bf16 is the default where the CPU has native bf16; bf16-act takes bf16
    activations there."""
    llm = make_llm(tiny_model("gemma3"), max_num_batched_tokens=96, **options)
    probe = random_prompts([50], seed=3)[0]
    greedy = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=2)
    seeded = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.9, seed=7, ignore_eos=True, logprobs=2)
    alone = [llm.generate([probe], p)[0].outputs[0] for p in (greedy, seeded)]
    others = random_prompts([3, 8, 30, 90, 12, 64, 25, 7, 40, 55, 18, 33, 77, 5], seed=4)
    mixed = [SamplingParams(max_tokens=4 + i, temperature=0.8 * (i % 2), ignore_eos=True) for i in range(len(others))]
    outs = llm.generate(others[:7] + [probe, probe] + others[7:], mixed[:7] + [greedy, seeded] + mixed[7:])
    assert len(outs) == 16
    for out, ref in zip((outs[7].outputs[0], outs[8].outputs[0]), alone):
        assert out.token_ids == ref.token_ids
        assert [lp.top for lp in out.logprobs] == [lp.top for lp in ref.logprobs]


def test_seeds_reproduce_and_differ(tiny_model):
    llm = make_llm(tiny_model("llama"))
    prompt = random_prompts([10], seed=5)[0]

    def run(seed):
        sp = SamplingParams(max_tokens=24, temperature=1.5, seed=seed, ignore_eos=True)
        return llm.generate([prompt], sp)[0].outputs[0].token_ids

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_prefix_cache_computes_only_the_suffix(tiny_model):
    llm = make_llm(tiny_model("llama"), max_num_batched_tokens=256)
    prefix = random_prompts([512], seed=6)[0]
    a, b = random_prompts([20, 21], seed=7)
    first = llm.generate([prefix + a], GREEDY)[0]
    before = llm.engine.core.stats().scheduler.prompt_tokens_computed
    second = llm.generate([prefix + b], GREEDY)[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens == 512
    assert llm.engine.core.stats().scheduler.prompt_tokens_computed - before == len(b)
    uncached = make_llm(tiny_model("llama"), enable_prefix_caching=False)
    assert second.outputs[0].token_ids == uncached.generate([prefix + b], GREEDY)[0].outputs[0].token_ids


def test_prefix_cache_with_sliding_window_layers(tiny_model, hf_model):
    path = tiny_model("gemma3")
    llm = make_llm(path)
    prefix = random_prompts([96], seed=8)[0]
    llm.generate([prefix + [5, 6, 7]], GREEDY)
    prompt = prefix + [9, 10, 11, 12]
    out = llm.generate([prompt], GREEDY)[0]
    assert out.num_cached_tokens == 96
    assert out.outputs[0].token_ids == hf_greedy(hf_model(path), prompt, 16)


def test_n_siblings_share_the_prompt_blocks(tiny_model):
    llm = make_llm(tiny_model("llama"))
    prompt = random_prompts([70], seed=9)[0]
    out = llm.generate([prompt], SamplingParams(n=3, max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert [o.index for o in out.outputs] == [0, 1, 2]
    assert out.outputs[0].token_ids == out.outputs[1].token_ids == out.outputs[2].token_ids
    children = llm.engine.outputs
    assert not children.groups  # finished groups are dropped
    computed = llm.engine.core.stats().scheduler.prompt_tokens_computed
    assert computed == 70 + 2 * (70 - 64)  # siblings recompute only the partial last block
    sampled = llm.generate([prompt], SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=3, ignore_eos=True))[0]
    again = llm.generate([prompt], SamplingParams(n=2, max_tokens=12, temperature=1.0, seed=3, ignore_eos=True))[0]
    assert [o.token_ids for o in sampled.outputs] == [o.token_ids for o in again.outputs]
    assert sampled.outputs[0].token_ids != sampled.outputs[1].token_ids


def test_preemption_keeps_outputs_exact(tiny_model, hf_model):
    path = tiny_model("llama")
    # 0.0001 GB of fp32 KV is 13 blocks of 16 tokens for this model: the four requests must preempt each other.
    llm = make_llm(path, kv_cache_memory_gb=0.0001, max_model_len=128)
    prompts = random_prompts([40, 45, 50, 35], seed=10)
    outs = llm.generate(prompts, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True))
    assert llm.engine.core.scheduler.num_preemptions > 0
    hf = hf_model(path)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 24)
    llm.engine.core.kv.check_integrity()
    assert llm.engine.core.kv.num_free_blocks() == [p.num_blocks - 1 for p in llm.engine.core.kv.pools]


def test_stops_and_lengths(tiny_model):
    llm = make_llm(tiny_model("llama"))
    prompt = random_prompts([12], seed=11)[0]
    free = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].outputs[0]
    assert len(free.token_ids) == 20 and free.finish_reason == "length"
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    by_id = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_id]))[0]
    assert by_id.outputs[0].token_ids == free.token_ids[: first + 1]
    assert by_id.outputs[0].finish_reason == "stop" and by_id.outputs[0].stop_reason == stop_id
    late = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_id], min_tokens=first + 2)
    assert len(llm.generate([prompt], late)[0].outputs[0].token_ids) > first + 1
    words = free.text.split()
    stop_word = words[3]
    by_str = llm.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop=[stop_word]))[0].outputs[0]
    assert by_str.finish_reason == "stop" and by_str.stop_reason == stop_word
    assert by_str.text == free.text[: free.text.index(stop_word)]


def test_eos_stops_unless_ignored(tiny_model):
    llm = make_llm(tiny_model("llama"))
    prompt = random_prompts([12], seed=12)[0]
    free = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0]
    llm.engine.tokenizer.special = type(llm.engine.tokenizer.special)(
        **{**llm.engine.tokenizer.special.__dict__, "eos_token_ids": (free.token_ids[2],)})
    stopped = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0))[0].outputs[0]
    first = free.token_ids.index(free.token_ids[2])
    assert stopped.token_ids == free.token_ids[: first + 1] and stopped.finish_reason == "stop"
    ignored = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].outputs[0]
    assert ignored.token_ids == free.token_ids


def test_streaming_yields_growing_text_and_finishes(tiny_model):
    llm = make_llm(tiny_model("llama"))
    prompt = random_prompts([9], seed=13)[0]
    outs = list(llm.stream(prompt, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)))
    assert outs[-1].finished and not any(o.finished for o in outs[:-1])
    lengths = [len(o.outputs[0].token_ids) for o in outs]
    assert lengths == sorted(lengths) and lengths[-1] == 10
    final = llm.generate([prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))[0]
    assert outs[-1].outputs[0].text == final.outputs[0].text
    assert not llm.engine.has_unfinished_requests()


def test_abort_frees_blocks(tiny_model):
    llm = make_llm(tiny_model("llama"))
    engine = llm.engine
    rid = engine.add_request(random_prompts([60], seed=14)[0], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.core.kv.usage > 0
    engine.abort_request(rid)
    assert not engine.has_unfinished_requests()
    engine.core.kv.check_integrity()
    assert engine.core.kv.num_free_blocks() == [p.num_blocks - 1 for p in engine.core.kv.pools]


def test_bad_requests_are_rejected(tiny_model):
    llm = make_llm(tiny_model("llama"), max_model_len=64)
    with pytest.raises(ValueError, match="empty"):
        llm.generate([[]], GREEDY)
    with pytest.raises(ValueError, match="context length"):
        llm.generate([list(range(4, 100))], GREEDY)
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[5, 100000]], GREEDY)
    assert not llm.engine.outputs.groups and not llm.engine.has_unfinished_requests()  # refusals leave nothing
    rid = llm.engine.add_request([5, 6, 7], GREEDY, request_id="same")
    with pytest.raises(ValueError, match="already in use"):
        llm.engine.add_request([8, 9], GREEDY, request_id="same")
    assert llm.engine.outputs.child_ids(rid) == ["same"]  # the first request is untouched
    llm.engine.abort_request(rid)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(TypeError, match="unknown engine options"):
        LLM(str(tiny_model("llama")), not_an_option=1)


def test_sampled_distribution_follows_temperature(tiny_model, hf_model):
    """Token frequencies from many seeded draws match softmax(logits / T) of the reference model."""
    path = tiny_model("llama")
    llm = make_llm(path)
    prompt = random_prompts([6], seed=15)[0]
    with torch.no_grad():
        logits = hf_model(path)(torch.tensor([prompt])).logits[0, -1]
    temp = 0.5
    probs = torch.softmax(logits / temp, -1)
    draws = 800
    params = [SamplingParams(max_tokens=1, temperature=temp, seed=s) for s in range(draws)]
    tokens = [o.outputs[0].token_ids[0] for o in llm.generate([prompt] * draws, params)]
    top_p, top_ids = probs.topk(3)
    for tok, p in zip(top_ids.tolist(), top_p.tolist()):
        observed = tokens.count(tok) / draws
        assert abs(observed - p) < 4 * math.sqrt(p * (1 - p) / draws) + 0.01, (tok, observed, p)


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma3"])
def test_bf16_weight_storage_matches_transformers_on_bf16_rounded_weights(kind, tiny_model):
    """dtype=bfloat16 on a CPU without bf16 arithmetic stores linear and embedding weights in bf16 and computes
    in fp32: exactly transformers in fp32 on the same bf16-rounded weights."""
    path = tiny_model(kind)
    llm = make_llm(path, dtype="bfloat16")
    core = llm.engine.core
    if core.dtype == torch.bfloat16:
        pytest.skip("this CPU computes in bf16 natively")
    assert core.model.weight_bytes_per_token() < make_llm(path).engine.core.model.weight_bytes_per_token() * 0.6
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()  # a private copy
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith(("proj.weight", "embed_tokens.weight", "lm_head.weight")):
                p.copy_(p.bfloat16().float())
    prompts = random_prompts([5, 40, 100], seed=3)
    outs = llm.generate(prompts, GREEDY)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 16)
    out = llm.generate([prompts[1]], SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0].outputs[0]
    with torch.no_grad():
        ref = torch.log_softmax(hf(torch.tensor([prompts[1]])).logits[0, -1], -1)
    top_vals, top_ids = ref.topk(5)
    assert [t for t, _ in out.logprobs[0].top] == top_ids.tolist()
    assert max(abs(a - b) for (_, a), b in zip(out.logprobs[0].top, top_vals.tolist())) < 1e-4
