"""Prefill/decode split between two engine cores (tiny Gemma 3: sliding-window and full-attention layers, prompts
past the window), over each KV transport (shm, tcp, and NIXL where it is installed): the prefill core holds its prompt's blocks, the decode core pulls the ones
it lacks and generates exactly the tokens of one aggregated engine, alone and beside other sequences; a pull that
cannot be had (the prefill core gone, the export expired, never released) falls back to computing the prompt; no
block is leaked on either side."""

from __future__ import annotations

import time

import pytest

from tokenfab.config import EngineConfig
from tokenfab.engine.core import EngineCore
from tokenfab.engine.kv_transfer.transport import nixl_api
from tokenfab.engine.messages import CoreOutput, CoreRequest
from tokenfab.engine.types import KVTransferParams, SamplingParams

TRANSPORTS = ["shm", "tcp", pytest.param("nixl", marks=pytest.mark.skipif(
    nixl_api() is None, reason="NIXL is not installed (pip install 'tokenfab[nixl]')"))]
GREEDY = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
SEEDED = SamplingParams(max_tokens=10, temperature=0.9, seed=11, ignore_eos=True)
PROMPT = [5 + (i * 7) % 200 for i in range(101)]
"""Past the 24-token window; 12 full blocks of 8 and a partial one."""
OTHER = [9 + (i * 5) % 150 for i in range(37)]


def core(model, **options) -> EngineCore:
    config = EngineConfig(model=str(model), dtype="float32", kv_cache_memory_gb=0.002, max_model_len=256,
                          block_size=8, max_num_batched_tokens=64, num_threads=1, **options)
    return EngineCore(config)


def run(engine: EngineCore, requests: list[CoreRequest]) -> dict[str, list[CoreOutput]]:
    for r in requests:
        engine.add_request(r)
    outputs: dict[str, list[CoreOutput]] = {r.request_id: [] for r in requests}
    while engine.has_unfinished():
        for out in engine.step():
            outputs[out.request_id].append(out)
    return outputs


def tokens(outs: list[CoreOutput]) -> list[int]:
    return [t for o in outs for t in o.new_token_ids]


def request(rid, prompt, params, transfer=None) -> CoreRequest:
    return CoreRequest(rid, list(prompt), params, time.monotonic(), kv_transfer=transfer)


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("gemma3")


@pytest.fixture(scope="module")
def expected(model):
    """An aggregated engine's tokens: the prompt alone (greedy, seeded) and beside another sequence."""
    engine = core(model)
    alone = run(engine, [request("a", PROMPT, GREEDY)])["a"]
    seeded = run(engine, [request("s", PROMPT, SEEDED)])["s"]
    engine.reset_prefix_cache()
    mixed = run(engine, [request("o", OTHER, GREEDY), request("m", PROMPT, GREEDY)])
    engine.close()
    return tokens(alone), tokens(seeded), tokens(mixed["m"]), tokens(mixed["o"])


def prefill(engine: EngineCore, rid: str, prompt: list[int]) -> KVTransferParams:
    """The prefill leg: one token, the prompt's KV held; returns what the decode side needs."""
    leg = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    [out] = [o for o in run(engine, [request(rid, prompt, leg, KVTransferParams(do_remote_decode=True))])[rid]
             if o.finish_reason]
    assert out.finish_reason == "length" and out.kv_transfer is not None
    return out.kv_transfer


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_the_decode_core_pulls_the_prompt_and_generates_the_aggregated_tokens(model, expected, transport):
    p, d = core(model, kv_transport=transport), core(model, kv_transport=transport)
    params = prefill(p, "r1", PROMPT)
    assert params.transport == transport and params.remote_blocks == len(PROMPT) // 8
    assert p.stats().transfer.exports_held == 1
    outs = run(d, [request("r1", PROMPT, GREEDY, params)])["r1"]
    assert tokens(outs) == expected[0]
    assert outs[-1].num_cached_tokens == 96  # every full block of the prompt but the last token's, pulled
    pulled = d.stats().transfer
    assert pulled.pulls == 1 and pulled.failures == 0 and pulled.pulled_blocks > 0 and pulled.pulled_bytes > 0
    # A sliding group sends only its window: fewer blocks than 12 per group.
    assert pulled.pulled_blocks < 12 * len(d.worker.groups)
    p.tick()  # the release arrived: the prefill core frees the blocks
    held = p.stats().transfer
    assert held.exports_held == 0 and held.exports_released == 1
    if transport == "tcp":
        assert held.sent_bytes == pulled.pulled_bytes

    # Seeded sampling, and the prompt inside a batch with another sequence on the decode core.
    params = prefill(p, "r2", PROMPT)
    assert tokens(run(d, [request("r2", PROMPT, SEEDED, params)])["r2"]) == expected[1]
    assert d.stats().transfer.pulls == 1  # the decode core had every block already: nothing pulled, released
    d.reset_prefix_cache()
    p.reset_prefix_cache()
    params = prefill(p, "r3", PROMPT)
    mixed = run(d, [request("o", OTHER, GREEDY), request("r3", PROMPT, GREEDY, params)])
    assert tokens(mixed["r3"]) == expected[2] and tokens(mixed["o"]) == expected[3]
    assert d.stats().transfer.pulls == 2
    p.tick()
    for engine in (p, d):
        engine.kv.check_integrity()
        engine.close()
    assert p.stats().transfer.exports_held == 0


def test_only_the_blocks_the_decode_core_lacks_are_pulled(model, expected):
    p, d = core(model, kv_transport="shm"), core(model, kv_transport="shm")
    run(d, [request("warm", PROMPT[:49], GREEDY)])  # 6 full blocks of the prompt cached on the decode side
    params = prefill(p, "r", PROMPT)
    outs = run(d, [request("r", PROMPT, GREEDY, params)])["r"]
    assert tokens(outs) == expected[0] and outs[-1].num_cached_tokens == 96
    full_group = [g for g, spec in enumerate(d.worker.groups) if spec.window is None][0]
    layers = len(d.worker.groups[full_group].layers)
    per_block = 2 * layers * 8 * d.arch.num_kv_heads * d.arch.head_dim * 4
    # The full-attention group lacked blocks 6..11 only; the sliding group needs its window's blocks.
    assert d.stats().transfer.pulled_bytes < 12 * per_block + 12 * per_block * 5
    p.tick()
    p.kv.check_integrity()
    d.kv.check_integrity()
    p.close()
    d.close()


def test_a_failed_pull_falls_back_to_computing_the_prompt(model, expected):
    p, d = core(model, kv_transport="tcp", kv_transfer_timeout_s=0.2), core(model, kv_transport="tcp")
    d.kv.puller.timeout_s = 0.5
    # The export timed out before the decode side asked: it is freed on the prefill side, recomputed here.
    params = prefill(p, "late", PROMPT)
    time.sleep(0.3)
    p.tick()
    assert p.stats().transfer.exports_expired == 1 and p.stats().transfer.exports_held == 0
    outs = run(d, [request("late", PROMPT, GREEDY, params)])["late"]
    assert tokens(outs) == expected[0] and outs[-1].num_cached_tokens == 0
    assert d.stats().transfer.failures == 1
    # The prefill core is gone: the pull times out, the prompt is computed here.
    params = prefill(p, "gone", PROMPT)
    p.close()
    d.reset_prefix_cache()
    outs = run(d, [request("gone", PROMPT, GREEDY, params)])["gone"]
    assert tokens(outs) == expected[0] and d.stats().transfer.failures == 2
    d.kv.check_integrity()
    d.close()


def test_aborted_legs_and_requests_hold_nothing_and_params_need_a_transport(model):
    p = core(model, kv_transport="shm")
    leg = SamplingParams(max_tokens=1, temperature=0)
    p.add_request(request("x", PROMPT, leg, KVTransferParams(do_remote_decode=True)))
    p.step()  # part of the prompt computed
    p.abort(["x"])
    assert p.stats().transfer.exports_held == 0 and p.stats().transfer.exported == 0
    p.kv.check_integrity()
    # A finished leg aborted (its request was): the export goes at once.
    prefill(p, "y", PROMPT)
    p.abort(["y"])
    p.tick()
    assert p.stats().transfer.exports_held == 0 and p.stats().transfer.exports_released == 1
    # A decode request aborted before it was admitted: it releases the export it will never pull.
    d = core(model, kv_transport="shm")
    params = prefill(p, "z", PROMPT)
    d.add_request(request("z", PROMPT, GREEDY, params))
    d.abort(["z"])
    p.tick()
    assert p.stats().transfer.exports_held == 0 and p.stats().transfer.exports_released == 2
    for engine in (p, d):
        engine.kv.check_integrity()
        engine.close()
    plain = core(model)
    with pytest.raises(ValueError, match="KV transport"):
        plain.add_request(request("y", PROMPT, leg, KVTransferParams(do_remote_decode=True)))
    plain.close()


def test_speculative_decoding_on_the_decode_core(model):
    from tokenfab.config import SpeculativeConfig

    repetitive = [5 + i % 13 for i in range(90)]  # n-gram drafts get accepted
    plain = core(model)
    want = tokens(run(plain, [request("a", repetitive, GREEDY)])["a"])
    plain.close()
    p = core(model, kv_transport="shm")
    d = core(model, kv_transport="shm", speculative=SpeculativeConfig(method="ngram"))
    params = prefill(p, "r", repetitive)
    assert tokens(run(d, [request("r", repetitive, GREEDY, params)])["r"]) == want
    assert d.stats().transfer.pulls == 1 and d.stats().spec.proposed_tokens > 0
    p.tick()
    for engine in (p, d):
        engine.kv.check_integrity()
        engine.close()


@pytest.mark.slow
@pytest.mark.parametrize("transport", TRANSPORTS)
def test_gemma_real_prefill_and_decode_split_gives_the_aggregated_tokens(transport):
    """The real default model (its 512-token sliding window): a 700-token prompt split over two cores."""
    options = dict(kv_cache_memory_gb=0.1, max_model_len=1024, num_threads=1)
    prompt = [2] + [1000 + (i * 37) % 20000 for i in range(699)]
    plain = EngineCore(EngineConfig(**options))
    want = tokens(run(plain, [request("a", prompt, GREEDY)])["a"])
    plain.close()
    p = EngineCore(EngineConfig(kv_transport=transport, **options))
    d = EngineCore(EngineConfig(kv_transport=transport, **options))
    params = prefill(p, "r", prompt)
    outs = run(d, [request("r", prompt, GREEDY, params)])["r"]
    assert tokens(outs) == want and outs[-1].num_cached_tokens == 688
    pulled = d.stats().transfer
    assert pulled.pulls == 1 and pulled.failures == 0
    p.tick()
    assert p.stats().transfer.exports_held == 0
    for engine in (p, d):
        engine.kv.check_integrity()
        engine.close()


def test_no_block_is_leaked_after_a_randomized_split_workload(model):
    """Random prompts (some sharing prefixes), legs finished, aborted mid-prefill or left to expire, decode requests
    pulled, aborted before admission or sent twice: afterwards both sides hold exactly what their tables say."""
    import random

    rng = random.Random(7)
    p = core(model, kv_transport="tcp", kv_transfer_timeout_s=0.3)
    d = core(model, kv_transport="tcp")
    shared = [7 + i % 90 for i in range(40)]
    for k in range(24):
        prompt = (shared if rng.random() < 0.5 else []) + [5 + rng.randrange(400) for _ in range(rng.randrange(9, 120))]
        fate = rng.choice(["pull", "pull", "abort-leg", "expire", "abort-decode"])
        if fate == "abort-leg":
            p.add_request(request(f"l{k}", prompt, SamplingParams(max_tokens=1, temperature=0),
                                  KVTransferParams(do_remote_decode=True)))
            p.step()
            p.abort([f"l{k}"])
            continue
        params = prefill(p, f"r{k}", prompt)
        if fate == "expire":
            continue
        d.add_request(request(f"r{k}", prompt, GREEDY, params))
        if fate == "abort-decode":
            d.abort([f"r{k}"])
        elif rng.random() < 0.5:
            d.step()  # admitted beside what comes next
        else:
            while d.has_unfinished():
                d.step()
        p.tick()
    while d.has_unfinished():
        d.step()
    time.sleep(0.35)
    p.tick()
    assert p.stats().transfer.exports_held == 0
    assert p.stats().transfer.exports_expired + p.stats().transfer.exports_released == p.stats().transfer.exported
    for engine in (p, d):
        engine.kv.check_integrity()
        assert sum(engine.kv.num_free_blocks()) == engine.kv.kv_stats().total_blocks  # nothing in use
        engine.close()
