"""Quantized models end to end on tiny random-weight checkpoints: next-token distributions close to the float
model, per-layer plans, configuration errors, the server with --quantization, and tokenfab eval's scoring."""

import json
import subprocess
import sys

import httpx
import pytest
import torch

from conftest import random_prompts, tiny_llm
from live_server import LiveServer
from tokenfab import LLM, SamplingParams
from tokenfab.config import EngineConfig
from tokenfab.evaluation.runner import evaluate, parse_variant
from tokenfab.evaluation.scoring import window_hidden
from tokenfab.kernels import cpu as cpu_kernels
from tokenfab.quant import FP8Weight, Int4Weight, Int8Weight, NVFP4Weight
from tokenfab.quant.dense import DenseWeight, OneDNNPackedWeight
from tokenfab.quant.plan import QuantPlan, build_plan

DENSE = (DenseWeight, OneDNNPackedWeight)
# KL(float || quantized) of next-token distributions, mean over positions, on the tiny random models (whose
# near-uniform logits make them far more sensitive than real ones): ~4x what was measured here.
KL_BOUND = {"int8": 1e-3, "fp8": 1e-2, "int4": 0.15, "nvfp4": 0.15}


def make_llm(path, **kw):
    return tiny_llm(path, **{"max_model_len": 512, "max_num_batched_tokens": 512, **kw})


def next_token_logprobs(llm, ids):
    model = llm.engine.core.model
    return torch.log_softmax(model.compute_logits(window_hidden(model, ids)), dim=-1)


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_quantized_models_stay_close_to_the_float_model(kind, tiny_model):
    path = tiny_model(kind)
    prompts = random_prompts([40, 90], seed=4)
    ref = [next_token_logprobs(make_llm(path), p) for p in prompts]
    for fmt, bound in KL_BOUND.items():
        llm = make_llm(path, quantization=fmt, quantization_exclude=[])
        got = [next_token_logprobs(llm, p) for p in prompts]
        kl = torch.cat([(r.exp() * (r - g)).sum(-1) for r, g in zip(ref, got)]).mean().item()
        assert 0 < kl < bound, (fmt, kl)
        agree = torch.cat([r.argmax(-1) == g.argmax(-1) for r, g in zip(ref, got)]).float().mean().item()
        if fmt == "int8":
            # W8A8 on CPU (int8 activations too); a random tiny model's next-token distributions are nearly flat,
            # so a few near-ties flip: 0.9 still fails for a broken kernel (agreement collapses to ~1/vocab).
            assert agree > 0.9


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_bf16_activations_stay_close_to_bf16_weights(kind, tiny_model):
    """bf16-act against bf16 weights computed in fp32: where the kernels take x as bf16, KL below 1.5e-4 (~4x the
    1.2e-5 and 3.3e-5 measured on Zen 4) and the same argmax at over 90 % of positions; elsewhere the same numbers."""
    path = tiny_model(kind)
    prompts = random_prompts([40, 90], seed=4)
    ref = [next_token_logprobs(make_llm(path, dtype="bfloat16"), p) for p in prompts]
    got = [next_token_logprobs(make_llm(path, quantization="bf16-act"), p) for p in prompts]
    kl = torch.cat([(r.exp() * (r - g)).sum(-1) for r, g in zip(ref, got)]).mean().item()
    if not cpu_kernels.bf16_activations():
        assert kl == 0
        return
    assert 0 < kl < 1.5e-4
    assert torch.cat([r.argmax(-1) == g.argmax(-1) for r, g in zip(ref, got)]).float().mean().item() > 0.9


def test_weight_bytes_shrink_with_the_format(tiny_model):
    path = tiny_model("llama")
    base = make_llm(path).engine.core.model.weight_bytes_per_token()
    int8 = make_llm(path, quantization="int8", quantization_exclude=[]).engine.core.model.weight_bytes_per_token()
    int4 = make_llm(path, quantization="int4", quantization_exclude=[]).engine.core.model.weight_bytes_per_token()
    assert int8 < 0.3 * base and int4 < 0.6 * int8


def test_plan_rules_exclusions_and_overrides(tiny_model):
    llm = make_llm(tiny_model("gemma3"), quantization="nvfp4", quantization_exclude=["layers.1.*"],
                   quantization_overrides=["lm_head=int8", "*.down_proj=fp8"])
    model = llm.engine.core.model
    assert isinstance(model.lm_head.stored, Int8Weight)
    assert isinstance(model.layers[0].self_attn.qkv_proj.stored, NVFP4Weight)
    assert isinstance(model.layers[0].mlp.down_proj.stored, FP8Weight)
    assert isinstance(model.layers[1].mlp.gate_up_proj.stored, DENSE)
    assert isinstance(model.layers[1].mlp.down_proj.stored, FP8Weight)  # overrides come before exclusions
    assert model.embed_tokens.weight.dtype == torch.float32  # the embedding is a lookup, never quantized
    label = llm.engine.core.quantization_label
    assert label == "nvfp4 (lm_head: int8, *.down_proj: fp8, layers.1.*: none)"


def test_plan_matching_and_defaults(monkeypatch):
    plan = QuantPlan("int4", (("lm_head", "int8"), ("layers.?.mlp.*", "none")))
    assert plan.format_for("lm_head") == "int8"
    assert plan.format_for("layers.3.mlp.down_proj") == "none"
    assert plan.format_for("layers.13.mlp.down_proj") == "int4"
    import tokenfab.quant.plan as plan_module

    monkeypatch.setitem(plan_module.DEFAULT_RULES, "int4", (("lm_head", "int8"),))
    assert build_plan("int4").rules == (("lm_head", "int8"),)
    assert build_plan("int4", exclude=()).rules == ()
    assert build_plan("int4", exclude=("lm_head",)).rules == (("lm_head", "none"),)


@pytest.mark.parametrize("options,message", [
    (dict(quantization="int3"), "unknown weight format 'int3'"),
    (dict(quantization="int4", quantization_overrides=("lm_head",)), "is not PATTERN=FORMAT"),
    (dict(quantization="int4", quantization_overrides=("lm_head=fp4",)), "unknown weight format 'fp4'"),
    (dict(quantization="int8", pack_weights=False), "quantization needs pack_weights=True"),
])
def test_bad_quantization_options_are_named(options, message):
    with pytest.raises(ValueError, match=message):
        EngineConfig(**options)


def test_server_serves_a_model_quantized_at_load(tiny_model):
    path = tiny_model("llama")
    server = LiveServer(path, "--quantization", "int8", "--quantization-exclude", "lm_head")
    try:
        card = httpx.get(f"{server.url}/v1/models").json()["data"][0]
        assert card["quantization"] == "int8 (lm_head: none)"
        resp = httpx.post(f"{server.url}/v1/completions", json={
            "model": "tiny", "prompt": "w5 w6 w7 w8", "max_tokens": 8, "temperature": 0, "ignore_eos": True},
            timeout=60).json()
    finally:
        assert server.stop() == 0
    offline = LLM(str(path), num_threads=1, kv_cache_memory_gb=0.05, quantization="int8",
                  quantization_exclude=["lm_head"])
    expected = offline.generate("w5 w6 w7 w8", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))[0]
    assert resp["choices"][0]["text"] == expected.outputs[0].text
    assert card["weight_bytes"] == offline.engine.core.model.weight_bytes_per_token()


def test_eval_scores_the_reference_like_transformers(tiny_model, hf_model, tmp_path):
    """Perplexity of the bf16-rounded reference equals transformers' on the same bf16-rounded weights and windows;
    an unquantized variant has zero KL and full agreement; a 4-bit one does not."""
    path = tiny_model("llama")
    corpus = tmp_path / "c.txt"
    corpus.write_text(" ".join(f"w{(i * 37) % 500 + 4}" for i in range(300)))
    result = evaluate(str(path), [parse_variant("none[]"), parse_variant("int4[]")], window=64, corpus=corpus,
                      progress=lambda m: None)
    ref, same, int4 = result["rows"]
    assert same["kl_mean"] == 0 and same["greedy_agreement"] == 1 and same["perplexity"] == ref["perplexity"]
    assert int4["kl_mean"] > 1e-4 and int4["weight_bytes"] < ref["weight_bytes"] / 4
    hf = hf_model(path)
    with torch.no_grad():
        original = {n: p.clone() for n, p in hf.named_parameters()}
        for p in hf.parameters():
            p.copy_(p.bfloat16().float())
        ids = [int(t[1:]) for t in corpus.read_text().split()]
        nll, count = 0.0, 0
        for start in range(0, len(ids), 63):
            window = [1] + ids[start:start + 63]
            lp = torch.log_softmax(hf(torch.tensor([window])).logits[0, :-1].double(), -1)
            nll -= lp.gather(1, torch.tensor(window[1:])[:, None]).sum().item()
            count += len(window) - 1
        for n, p in hf.named_parameters():
            p.copy_(original[n])
    assert ref["tokens"] == count
    assert abs(ref["perplexity"] / torch.tensor(nll / count).exp().item() - 1) < 1e-4


def test_eval_variants_name_every_weight_format():
    from tokenfab.quant import WEIGHT_FORMATS

    for fmt in WEIGHT_FORMATS:
        assert parse_variant(fmt).plan.default == fmt
        assert parse_variant(f"{fmt}[lm_head=int8]").plan.format_for("lm_head") == "int8"
    with pytest.raises(ValueError, match="bad variant"):
        parse_variant("-int8")


def test_eval_command_writes_json_and_markdown(tiny_model, tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("w5 w6 w7 w8 w9 " * 30)
    proc = subprocess.run([sys.executable, "-m", "tokenfab.cli", "eval", "--model", str(tiny_model("qwen2")),
                           "--corpus", str(corpus), "--window", "32", "--formats", "int8,nvfp4[lm_head=int8]",
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out" / "eval.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["bf16 (reference)", "int8", "nvfp4[lm_head=int8]"]
    assert result["rows"][2]["plan"] == "nvfp4 (lm_head: int8)"
    assert "| nvfp4[lm_head=int8] |" in (tmp_path / "out" / "eval.md").read_text()
    bad = subprocess.run([sys.executable, "-m", "tokenfab.cli", "eval", "--model", str(tiny_model("qwen2")),
                          "--formats", "int4[lm_head]"], capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "is not PATTERN=FORMAT" in bad.stderr


def test_the_ladder_gets_a_quantization_rung():
    from tokenfab.bench.ladder import rungs

    assert len(rungs((1, 4), "int4")) == len(rungs((1, 4))) + 1
    last = rungs((1, 4), "int4")[-1]
    assert last.name == "+ int4 weights" and last.max_seqs == 4
    assert last.flags == (*rungs((1, 4))[-1].flags, "--quantization", "int4")


def test_gptq_method_quantizes_at_load_from_calibration_text(tiny_model):
    path = tiny_model("gemma3")
    rtn = make_llm(path, quantization="int4")
    gptq = make_llm(path, quantization="int4", quantization_method="gptq")
    assert gptq.engine.core.quantization_label == "int4/gptq (lm_head: int8)"
    a = rtn.engine.core.model.layers[2].mlp.down_proj.stored
    b = gptq.engine.core.model.layers[2].mlp.down_proj.stored
    assert isinstance(b, Int4Weight) and b.nbytes == a.nbytes and not torch.equal(a.packed, b.packed)
    assert isinstance(gptq.engine.core.model.lm_head.stored, Int8Weight)  # int8 layers stay round-to-nearest
    out = gptq.generate([[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4
