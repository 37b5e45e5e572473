"""Mixture-of-experts models (Qwen3-MoE, Mixtral, DeepSeek-V3 with latent attention) on tiny random-weight
checkpoints: transformers' tokens and log-probabilities, alone and in mixed batches; experts in the weight formats;
MLA's cache holding the latent only, through the KV tiers and between prefill and decode cores; YaRN rope; the
expert load the engine counts."""

import pytest
import torch

from conftest import hf_greedy, random_prompts, tiny_llm
from tokenfab import LLM, SamplingParams
from tokenfab.models.layers import Linear
from tokenfab.models.mla import MLAttention
from tokenfab.models.moe import SparseMoE

KINDS = ["qwen3_moe", "mixtral", "deepseek_v3"]
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_matches_transformers_alone_and_in_a_chunked_mixed_batch(kind, tiny_model, hf_model):
    path = tiny_model(kind)
    llm = tiny_llm(path)
    prompts = random_prompts([5, 40, 100, 17, 70], seed=1)
    sampled = SamplingParams(max_tokens=9, temperature=0.9, seed=3, ignore_eos=True)
    outs = llm.generate(prompts + prompts[:2], [GREEDY] * 5 + [sampled] * 2)
    hf = hf_model(path)
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 16)
    alone = llm.generate([prompts[2]], GREEDY)[0].outputs[0].token_ids
    assert alone == outs[2].outputs[0].token_ids


@pytest.mark.parametrize("kind", KINDS)
def test_logprobs_match_transformers_at_every_step(kind, tiny_model, hf_model):
    """Top-5 log-probabilities of 8 greedy steps against transformers' forward over the same tokens (tolerance
    1e-4: fp32, different summation orders)."""
    path = tiny_model(kind)
    prompt = random_prompts([60], seed=2)[0]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, logprobs=5)
    out = tiny_llm(path).generate([prompt], params)[0].outputs[0]
    with torch.no_grad():
        logits = hf_model(path)(torch.tensor([prompt + out.token_ids[:-1]])).logits[0, len(prompt) - 1 :]
    ref = torch.log_softmax(logits, dim=-1)
    worst = 0.0
    for step, lp in enumerate(out.logprobs):
        values, ids = ref[step].topk(5)
        assert [t for t, _ in lp.top] == ids.tolist()
        worst = max(worst, max(abs(a - b) for (_, a), b in zip(lp.top, values.tolist())))
    assert worst < 1e-4


def test_mla_cache_holds_the_latent_only(tiny_model):
    """DeepSeek-V3's cache: kv_lora_rank + qk_rope_head_dim numbers per token and layer (32 + 8 here), against
    heads × (nope + rope) keys and heads × v_head_dim values for the equivalent MHA."""
    llm = tiny_llm(tiny_model("deepseek_v3"))
    core = llm.engine.core
    arch, cache = core.model.arch, core.worker.cache
    assert arch.mla is not None and all(isinstance(layer.self_attn, MLAttention) for layer in core.model.layers)
    slots = sum(k.shape[0] * k.shape[1] for k in cache.k)  # layers × token slots
    assert cache.nbytes == slots * (32 + 8) * 4
    mha = arch.num_heads * (arch.mla.qk_nope_head_dim + arch.mla.qk_rope_head_dim + arch.mla.v_head_dim)
    assert mha / (32 + 8) == 4.0  # 4 heads × (16 + 8 + 16) = 160 numbers per token and layer


@pytest.mark.parametrize("fmt", ["int8", "int4", "fp8", "nvfp4"])
def test_experts_take_the_weight_formats(fmt, tiny_model):
    """Quantized experts: every expert projection stored in the format, the routers kept in fp32, and the
    next-token distributions close to the float model's (the dense models' KL bounds, tests/test_quant_model.py)."""
    from test_quant_model import KL_BOUND, next_token_logprobs

    from tokenfab.quant import QUANTIZED_FORMATS

    path = tiny_model("qwen3_moe")
    prompts = random_prompts([30, 50], seed=5)
    ref = [next_token_logprobs(tiny_llm(path), p) for p in prompts]
    llm = tiny_llm(path, quantization=fmt, quantization_exclude=[])
    moes = llm.engine.core.model.moe_layers
    assert len(moes) == 2  # layer 1 of 3 is dense (mlp_only_layers)
    for moe in moes:
        for expert in moe.experts.values():
            assert isinstance(expert.gate_up_proj.stored, QUANTIZED_FORMATS[fmt])
            assert isinstance(expert.down_proj.stored, QUANTIZED_FORMATS[fmt])
        assert moe.gate.weight.dtype == torch.float32
    got = [next_token_logprobs(llm, p) for p in prompts]
    kl = torch.cat([(r.exp() * (r - g)).sum(-1) for r, g in zip(ref, got)]).mean().item()
    assert 0 < kl < KL_BOUND[fmt], kl


def test_a_token_reads_only_its_experts(tiny_model):
    """weight_bytes_per_token (the bandwidth bound's numerator) counts 2 of the 8 routed experts of each MoE
    layer, all of everything else."""
    model = tiny_llm(tiny_model("qwen3_moe")).engine.core.model
    routed = {id(m) for moe in model.modules() if isinstance(moe, SparseMoE) for m in moe.experts.modules()}
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    experts = sum(m.nbytes for m in linears if id(m) in routed)
    others = sum(m.nbytes for m in linears if id(m) not in routed)
    small = sum(p.numel() * 4 for name, p in model.named_parameters() if "norm" in name or name.endswith("gate.weight"))
    assert experts > others  # the experts are most of the weights, as in a real MoE
    assert model.weight_bytes_per_token() == others + experts * 2 // 8 + small


def test_expert_load_is_counted_and_exported(tiny_model):
    llm = tiny_llm(tiny_model("deepseek_v3"))
    prompts = random_prompts([20, 33], seed=6)
    llm.generate(prompts, SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    moe = llm.engine.core.stats().moe
    computed = 20 + 33 + 2 * 4  # prompts, then 4 decode steps each (the 5th token is sampled, not computed)
    assert len(moe.expert_tokens) == 2 and all(sum(layer) == computed * 3 for layer in moe.expert_tokens)
    assert moe.imbalance >= 1.0


def test_deepseek_v3_with_yarn_rope_matches_transformers(tmp_path, hf_model):
    """DeepSeek-V3's own rope: YaRN (factor 4 over a 64-token trained context here), its mscale folded into the
    attention scale; prompts past the trained context."""
    from tiny_models import write_tiny_model

    yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
            "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}
    path = write_tiny_model("deepseek_v3", tmp_path, rope_parameters=yarn)
    prompts = random_prompts([30, 120], seed=7)
    outs = tiny_llm(path).generate(prompts, GREEDY)
    hf = hf_model(path)
    assert hf.config.rope_parameters["rope_type"] == "yarn"
    for prompt, out in zip(prompts, outs):
        assert out.outputs[0].token_ids == hf_greedy(hf, prompt, 16)


def test_mla_latents_come_back_from_the_kv_tiers_with_the_same_tokens(tiny_model, tmp_path):
    """DeepSeek-V3's latent cache through the host and disk tiers: an evicted prefix loaded back gives the tokens of
    an engine without tiers."""
    from test_kv_tiers_engine import FILLERS, NEXT_TURN, SESSION

    def engine(**tiers) -> LLM:  # about 50 blocks of 8 tokens (480 bytes per token: the fillers evict the session)
        return LLM(model, dtype="float32", kv_cache_memory_gb=0.0002, max_model_len=256, block_size=8,
                   max_num_batched_tokens=64, num_threads=1, **tiers)

    model = str(tiny_model("deepseek_v3"))
    want = engine().generate([NEXT_TURN], GREEDY)[0].outputs[0].token_ids
    llm = engine(kv_host_gb=0.0002, kv_disk_dir=str(tmp_path))
    llm.generate([SESSION], GREEDY)
    llm.generate(FILLERS, GREEDY)
    out = llm.generate([NEXT_TURN], GREEDY)[0]
    stats = llm.engine.core.kv_tiers.snapshot()
    assert out.outputs[0].token_ids == want
    assert stats.host_hit_tokens + stats.disk_hit_tokens > 0 and out.num_cached_tokens >= 112
    llm.engine.core.kv.check_integrity()
    llm.engine.core.close()


def test_mla_latents_move_from_a_prefill_core_to_a_decode_core(tiny_model):
    from test_kv_transfer import GREEDY as TEN, PROMPT, core, prefill, request, run, tokens

    model = tiny_model("deepseek_v3")
    aggregated = core(model)
    want = tokens(run(aggregated, [request("a", PROMPT, TEN)])["a"])
    aggregated.close()
    p, d = core(model, kv_transport="shm"), core(model, kv_transport="shm")
    params = prefill(p, "r", PROMPT)
    outs = run(d, [request("r", PROMPT, TEN, params)])["r"]
    assert tokens(outs) == want
    assert d.stats().transfer.pulled_blocks == 12 and outs[-1].num_cached_tokens == 96
    for engine in (p, d):
        engine.close()


GROUPED_CHECK = """
import sys, torch
from tokenfab import LLM, SamplingParams
from tokenfab.models.moe import SparseMoE
llm = LLM(sys.argv[1], dtype="float32", pack_weights=False, kv_cache_memory_gb=0.02, max_num_batched_tokens=64)
params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
prompts = [[5 + (i * 7) % 300 for i in range(n)] for n in (9, 40)]
looped = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
moes = llm.engine.core.model.moe_layers
x = torch.randn(37, moes[0].hidden_size, generator=torch.Generator().manual_seed(0))
before = [m(x) for m in moes]
assert all(m.stack_experts() for m in moes)
after = [m(x) for m in moes]
err = max(((a - b).abs().max() / b.abs().max()).item() for a, b in zip(after, before))
assert err < 1e-5, err
assert [o.outputs[0].token_ids for o in llm.generate(prompts, params)] == looped
print("ok")
"""


@pytest.mark.parametrize("kind", ["qwen3_moe", "deepseek_v3"])
def test_the_triton_grouped_gemm_path_matches_the_expert_loop_under_the_interpreter(kind, tiny_model):
    """The GPU path (experts stacked, one Triton grouped GEMM per projection) on the CPU under TRITON_INTERPRET=1:
    each MoE layer's output within 1e-5 of the per-expert loop, and the same greedy tokens."""
    import importlib.util
    import os
    import subprocess
    import sys

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    proc = subprocess.run([sys.executable, "-c", GROUPED_CHECK, str(tiny_model(kind))], capture_output=True,
                          text=True, timeout=600, env={**os.environ, "TRITON_INTERPRET": "1"})
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-3000:]
