"""Decode steps in one kernel call (tokenfab.models.cpu_decode) equal the model's forward bit for bit."""

import pytest
import torch
from gguf import GGMLQuantizationType as T

from conftest import random_prompts, tiny_llm
from tokenfab import LLM, SamplingParams
from tokenfab.kernels import cpu as kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels need g++ and AVX2/FMA/F16C")


def make_llm(path, dtype):
    return tiny_llm(path, dtype=dtype)


def check_decode_steps(llm: LLM, prompts: list[list[int]]) -> None:
    """Every decode-only step of a mixed workload (prefills chunked beside decodes, sliding windows passed,
    batches of 1 to 4) is computed both ways: the hidden states must be identical, and the KV the model's
    forward writes again must be what the fused step wrote."""
    core = llm.engine.core
    runner, model, cache = core.worker.runner, core.model, core.worker.cache
    fused = runner.decode_step
    assert fused is not None
    checked = []

    def both(input_ids, positions, metadata):
        hidden = fused.forward(input_ids, positions, metadata)
        if hidden is not None:
            k_after, v_after = [k.clone() for k in cache.k], [v.clone() for v in cache.v]
            assert torch.equal(hidden, model(input_ids, positions))
            assert all(torch.equal(a, b) for a, b in zip(k_after + v_after, cache.k + cache.v))
            checked.append(input_ids.shape[0])
        return hidden

    runner.decode_step = type("Both", (), {"forward": staticmethod(both)})()
    outs = llm.generate(prompts, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert all(len(o.outputs[0].token_ids) == 40 for o in outs)
    llm.generate([prompts[2]], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
    assert 1 in checked and max(checked) == len(prompts)  # single sequences and full batches took the fused step


@pytest.mark.parametrize("kind", ["llama", "qwen2", "qwen3", "gemma3"])
def test_bf16_decode_steps_equal_the_model_forward(kind, tiny_model):
    llm = make_llm(tiny_model(kind), "bfloat16")
    if llm.engine.core.dtype != torch.float32:
        pytest.skip("this CPU computes in bf16 natively")
    check_decode_steps(llm, random_prompts([5, 40, 100, 17], seed=2))


def test_gguf_decode_steps_equal_the_model_forward(tmp_path):
    """A GGUF model packed, every projection type with a kernel, q/k/v of mixed types in one fused weight."""
    from test_quant_gguf_packed import LAYER_TYPES, write_quantized_llama

    path = tmp_path / "tiny.gguf"
    types = [{leaf: T.Q8_0 if leaf == "attn_v" else t for leaf, t in layer.items()} for layer in LAYER_TYPES]
    write_quantized_llama(path, types)
    llm = LLM(str(path), quantization="gguf", dtype="float32", max_model_len=256, kv_cache_memory_gb=0.02,
              max_num_batched_tokens=64)
    check_decode_steps(llm, random_prompts([5, 40, 100], seed=4, vocab=200))


@pytest.mark.parametrize("kind", ["qwen2", "gemma3"])
def test_int8_decode_steps_equal_the_model_forward(kind, tiny_model):
    llm = LLM(str(tiny_model(kind)), quantization="int8", kv_cache_memory_gb=0.02, max_model_len=1024,
              max_num_batched_tokens=64)
    check_decode_steps(llm, random_prompts([5, 40, 100, 17, 3], seed=5))


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_bf16_activation_decode_steps_equal_the_model_forward(kind, tiny_model):
    """bf16-act: the fused step takes x as bf16 where the kernels do (tf_bf16_activations) exactly as the forward."""
    llm = LLM(str(tiny_model(kind)), quantization="bf16-act", kv_cache_memory_gb=0.02, max_model_len=1024,
              max_num_batched_tokens=64)
    native = "bf16 activations (vdpbf16ps)" if kernels.bf16_activations() else "fp32 activations"
    assert f"bf16-act: {native}" in llm.engine.core.info().quantization  # what /v1/models reports
    check_decode_steps(llm, random_prompts([5, 40, 100, 17], seed=6))


def test_other_weight_formats_keep_the_forward(tiny_model):
    """fp32 weights (oneDNN) and the formats without a bound kernel keep the per-layer forward."""
    path = tiny_model("llama")
    assert make_llm(path, "float32").engine.core.worker.runner.decode_step is None
    fp8 = LLM(str(path), quantization="fp8", kv_cache_memory_gb=0.02, max_model_len=1024)
    assert fp8.engine.core.worker.runner.decode_step is None
