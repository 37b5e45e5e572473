"""Speculative decoding on tiny random-weight models: every proposer gives exactly the non-speculative engine's
greedy tokens (single requests and chunked batches mixed with prefills, sliding-window layers included), and
stops, logprobs, penalties, n > 1, seeds, preemption and cost attribution behave as without speculation."""

from __future__ import annotations

import json
import math

import pytest

from conftest import random_prompts, tiny_llm
from tiny_models import add_mtp_modules, write_tiny_model
from tokenfab import LLM, SamplingParams
from tokenfab.config import SpeculativeConfig

GREEDY = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
def make_llm(path, speculative=None, **kw):
    return tiny_llm(path, speculative=speculative or "none", **{"num_threads": 1, **kw})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """kind -> (target with two MTP modules that copy their input token, a different random draft)."""
    made = {}

    def get(kind):
        if kind not in made:
            root = tmp_path_factory.mktemp(f"spec-{kind}")
            target = add_mtp_modules(write_tiny_model(kind, root / "target"), 2, copy_tokens=True)
            made[kind] = (target, write_tiny_model(kind, root / "draft", seed=1))
        return made[kind]

    return get


def spec_config(method: str, target, draft, adaptive=False, k=4) -> SpeculativeConfig:
    if method == "draft-self":
        return SpeculativeConfig("draft", str(target), k, adaptive=adaptive)
    if method == "draft-other":
        return SpeculativeConfig("draft", str(draft), k, adaptive=adaptive)
    return SpeculativeConfig(method, None, 2 if method == "mtp" else k, adaptive=adaptive)


def copy_prompts():
    """Repetitive prompts (where lookup and copying drafts are accepted) mixed with random ones."""
    rep = random_prompts([11], seed=21)[0]
    return [rep * 4, random_prompts([40], seed=22)[0], rep * 2 + random_prompts([90], seed=23)[0],
            random_prompts([5], seed=24)[0], rep * 3 + random_prompts([60], seed=25)[0]]


def assert_clean(llm: LLM) -> None:
    core = llm.engine.core
    core.kv.check_integrity()
    assert core.kv.num_free_blocks() == [p.num_blocks - 1 for p in core.kv.pools]
    assert not llm.engine.has_unfinished_requests()
    proposer = core.speculator.proposer
    if hasattr(proposer, "kv"):  # the draft model's own cache
        proposer.kv.check_integrity()


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
@pytest.mark.parametrize("method", ["ngram", "draft-self", "draft-other", "mtp"])
def test_greedy_is_identical_with_every_proposer(kind, method, models):
    target, draft = models(kind)
    prompts = copy_prompts()
    expected = [o.outputs[0].token_ids for o in make_llm(target).generate(prompts, GREEDY)]
    llm = make_llm(target, spec_config(method, target, draft))
    # One at a time (pure decode with drafts), then all together (chunked prefills mixed with verification).
    alone = [llm.generate([p], GREEDY)[0].outputs[0].token_ids for p in prompts[:2]]
    batched = [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)]
    assert alone == expected[:2]
    assert batched == expected
    stats = llm.engine.core.stats()
    assert stats.spec.proposed_tokens > 0 and stats.spec.steps_on > 0
    if method in ("draft-self", "mtp"):
        assert stats.spec.accepted_tokens > 0
    if method == "draft-self":  # the target drafting for itself is always right
        assert stats.spec.accepted_tokens == stats.spec.proposed_tokens
    assert_clean(llm)


def test_adaptive_policy_keeps_greedy_identical(models):
    target, draft = models("llama")
    prompts = copy_prompts()
    expected = [o.outputs[0].token_ids for o in make_llm(target).generate(prompts, GREEDY)]
    for method in ("ngram", "draft-other"):
        llm = make_llm(target, spec_config(method, target, draft, adaptive=True))
        assert [o.outputs[0].token_ids for o in llm.generate(prompts, GREEDY)] == expected
        assert_clean(llm)


@pytest.mark.parametrize("method", ["ngram", "draft-self"])
def test_stops_inside_an_accepted_run_end_the_request_there(method, models):
    target, draft = models("llama")
    base, llm = make_llm(target), make_llm(target, spec_config(method, target, draft))
    prompt = copy_prompts()[0]
    free = base.generate([prompt], SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))[0].outputs[0]
    stop_id = free.token_ids[9]
    cases = [SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_id]),
             SamplingParams(max_tokens=30, temperature=0, stop_token_ids=[stop_id], min_tokens=12),
             SamplingParams(max_tokens=7, temperature=0, ignore_eos=True),
             SamplingParams(max_tokens=30, temperature=0, stop=[free.text.split()[6]])]
    for params in cases:
        want, got = base.generate([prompt], params)[0].outputs[0], llm.generate([prompt], params)[0].outputs[0]
        assert (got.token_ids, got.text, got.finish_reason, got.stop_reason) == \
            (want.token_ids, want.text, want.finish_reason, want.stop_reason), params
    assert llm.engine.core.stats().spec.accepted_tokens > 0
    assert_clean(llm)


def test_eos_inside_an_accepted_run(models):
    target, draft = models("llama")
    base, llm = make_llm(target), make_llm(target, spec_config("draft-self", target, draft))
    prompt = copy_prompts()[2]
    free = base.generate([prompt], GREEDY)[0].outputs[0]
    for engine in (base, llm):
        tok = engine.engine.tokenizer
        tok.special = type(tok.special)(**{**tok.special.__dict__, "eos_token_ids": (free.token_ids[8],)})
    params = SamplingParams(max_tokens=24, temperature=0)
    want, got = base.generate([prompt], params)[0].outputs[0], llm.generate([prompt], params)[0].outputs[0]
    assert got.token_ids == want.token_ids and got.finish_reason == want.finish_reason == "stop"
    assert_clean(llm)


def test_logprobs_of_every_emitted_token_match(models):
    target, draft = models("gemma3")
    prompts = copy_prompts()[:3]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=3)
    want = make_llm(target).generate(prompts, params)
    got = make_llm(target, spec_config("draft-self", target, draft)).generate(prompts, params)
    for a, b in zip(want, got):
        la, lb = a.outputs[0].logprobs, b.outputs[0].logprobs
        assert len(la) == len(lb) == 16
        for x, y in zip(la, lb):
            assert (x.token_id, x.rank, [t for t, _ in x.top]) == (y.token_id, y.rank, [t for t, _ in y.top])
            assert abs(x.logprob - y.logprob) < 1e-4


def test_penalties_apply_per_position_of_the_draft_run(models):
    target, draft = models("llama")
    prompts = copy_prompts()[:3]
    params = SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, repetition_penalty=1.3,
                            presence_penalty=0.5, frequency_penalty=0.3)
    want = [o.outputs[0].token_ids for o in make_llm(target).generate(prompts, params)]
    llm = make_llm(target, spec_config("draft-self", target, draft))
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
    stats = llm.engine.core.stats()
    assert stats.spec.accepted_tokens > 0  # drafts were accepted while penalties changed each position


def test_seeded_sampling_n_siblings_are_identical_with_speculation(models):
    """Deterministic drafts are verified with the same noise, in the same order, as plain sampling. (At a low
    temperature, so that the draft's argmax is often the sample and drafts are accepted whatever the seed.)"""
    target, draft = models("llama")
    prompts = copy_prompts()[:2]
    params = SamplingParams(n=3, max_tokens=20, temperature=0.3, top_p=0.95, seed=5, ignore_eos=True, logprobs=1)
    want = make_llm(target).generate(prompts, params)
    for method in ("ngram", "draft-self", "mtp"):
        llm = make_llm(target, spec_config(method, target, draft))
        got = llm.generate(prompts, params)
        for a, b in zip(want, got):
            assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs], method
        # Sampled text of a random model rarely repeats itself, so lookup finds little and copying drafts miss.
        assert llm.engine.core.stats().spec.proposed_tokens > 0 or method == "ngram"
        if method == "draft-self":
            assert llm.engine.core.stats().spec.accepted_tokens > 0, method
        assert_clean(llm)


def test_preemption_with_speculation_keeps_outputs_exact(models):
    target, draft = models("llama")
    prompts = random_prompts([40, 45, 50, 35], seed=10)
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    want = [o.outputs[0].token_ids for o in make_llm(target).generate(prompts, params)]
    # 13 KV blocks of 16 tokens: the four requests preempt each other, drafts and all.
    llm = make_llm(target, spec_config("draft-self", target, draft), kv_cache_memory_gb=0.0001, max_model_len=128)
    assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == want
    assert llm.engine.core.scheduler.num_preemptions > 0
    assert llm.engine.core.stats().spec.accepted_tokens > 0
    assert_clean(llm)
    assert llm.engine.core.speculator.proposer._shadows == {}


def test_cost_is_split_over_processed_tokens_and_adds_up(models):
    """Several tokens emitted per step still bill every step in full: requests' costs sum to the engine's."""
    target, draft = models("llama")
    llm = make_llm(target, spec_config("draft-self", target, draft))
    outs = llm.generate(copy_prompts(), GREEDY)
    core = llm.engine.core
    stats = core.stats()
    assert stats.scheduler.generated_tokens == sum(len(o.outputs[0].token_ids) for o in outs)
    assert stats.scheduler.steps < stats.scheduler.generated_tokens  # several tokens per step
    assert math.isclose(sum(o.cost.usd for o in outs), core.meter.usd, rel_tol=1e-9)
    assert math.isclose(sum(o.cost.device_seconds for o in outs), core.meter.busy_seconds, rel_tol=1e-9)
    assert core.meter.tokens == stats.scheduler.tokens_computed  # drafts under verification are billed as processed
    assert 0 < stats.spec.draft_seconds < stats.cost.busy_seconds


def test_speculative_options_are_validated(models):
    target, _ = models("llama")
    for bad, message in [("bogus", "unknown speculative method"), ("draft", "draft needs a model"),
                         ("ngram:x", "unknown speculative method")]:
        with pytest.raises(ValueError, match=message):
            SpeculativeConfig.parse(bad)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        SpeculativeConfig("ngram", num_speculative_tokens=0)
    with pytest.raises(ValueError, match="ngram_min"):
        SpeculativeConfig("ngram", ngram_min=5, ngram_max=3)
    plain = write_tiny_model("llama", target.parent / "plain")
    with pytest.raises(ValueError, match="no MTP modules"):
        make_llm(plain, "mtp")
    with pytest.raises(FileNotFoundError):
        make_llm(target, f"draft:{target.parent / 'nowhere'}")
    config = json.loads((plain / "config.json").read_text())
    (plain / "config.json").write_text(json.dumps({**config, "vocab_size": 256}))
    with pytest.raises(ValueError, match="share the target's tokenizer"):
        make_llm(target, f"draft:{plain}")
