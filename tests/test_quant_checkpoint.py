"""Quantized checkpoints: a ModelOpt NVFP4 checkpoint written here independently of tokenfab's writer loads
bit-exactly (q/k/v and gate/up fused with their own weight_scale_2); `tokenfab quantize` round-trips every
format; tied LM heads, mixed formats and unsupported schemes."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_llm
from test_quant_formats import ref_e2m1_value, ref_nvfp4, ref_pack
from tokenfab import SamplingParams
from tokenfab.quant import QUANTIZED_FORMATS, Int4Weight, Int8Weight, NVFP4Weight, cpu_linear
from tokenfab.quantize.export import quantize_checkpoint

PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300, 17, 4, 90, 91]]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def make_llm(path, **kw):
    return tiny_llm(path, **{"kv_cache_memory_gb": 0.01, "max_model_len": 256, "max_num_batched_tokens": 512, **kw})


def next_logprobs(llm, prompt):
    out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0].outputs[0]
    return out.logprobs[0].top


def ref_dequantize(codes: np.ndarray, scales: np.ndarray, scale_2: float) -> np.ndarray:
    values = np.vectorize(ref_e2m1_value)(codes).astype(np.float32)
    n, k = codes.shape
    scale = scales.astype(np.float32) * np.float32(scale_2)
    return (values.reshape(n, k // 16, 16) * scale[:, :, None]).reshape(n, k)


@pytest.fixture(scope="module")
def modelopt_checkpoint(tiny_model, tmp_path_factory):
    """The tiny Llama exported as ModelOpt does it, by the reference in test_quant_formats (pure numpy):
    per-projection uint8 weight, fp8 weight_scale, scalar fp32 weight_scale_2 and input_scale; lm_head excluded.
    Also a float copy holding exactly the dequantized weights, the loader's expected result."""
    src = tiny_model("llama")
    out = tmp_path_factory.mktemp("modelopt")
    dequantized_dir = tmp_path_factory.mktemp("dequantized")
    tensors = load_file(str(src / "model.safetensors"))
    quantized, dequantized = {}, {}
    for name, t in tensors.items():
        module = name.removesuffix(".weight")
        if module.split(".")[-1] not in PROJECTIONS:
            quantized[name] = dequantized[name] = t
            continue
        codes, scales, scale_2 = ref_nvfp4(t.numpy())
        quantized[f"{module}.weight"] = torch.from_numpy(ref_pack(codes))
        quantized[f"{module}.weight_scale"] = torch.from_numpy(scales).to(torch.float8_e4m3fn)
        quantized[f"{module}.weight_scale_2"] = torch.tensor(scale_2, dtype=torch.float32)
        quantized[f"{module}.input_scale"] = torch.tensor(0.5, dtype=torch.float32)
        dequantized[name] = torch.from_numpy(ref_dequantize(codes, scales, scale_2))
    save_file(quantized, str(out / "model.safetensors"))
    save_file(dequantized, str(dequantized_dir / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    for path in (out, dequantized_dir):
        for f in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy(src / f, path / f)
    (dequantized_dir / "config.json").write_text(json.dumps(config))
    config["quantization_config"] = {"quant_method": "modelopt", "quant_algo": "NVFP4", "group_size": 16,
                                     "ignore": ["lm_head"], "producer": {"name": "modelopt", "version": "0.29.0"}}
    (out / "config.json").write_text(json.dumps(config))
    return out, dequantized_dir, tensors


def test_modelopt_checkpoint_loads_bit_exactly_with_fused_shards(modelopt_checkpoint):
    path, dequantized_dir, float_tensors = modelopt_checkpoint
    llm = make_llm(path)
    model = llm.engine.core.model
    attn, mlp = model.layers[0].self_attn, model.layers[0].mlp
    assert isinstance(attn.qkv_proj.stored, NVFP4Weight) and isinstance(mlp.gate_up_proj.stored, NVFP4Weight)
    assert not isinstance(model.lm_head.stored, NVFP4Weight)  # excluded: loaded as a float weight
    expected = load_file(str(dequantized_dir / "model.safetensors"))
    qkv = torch.cat([expected[f"model.layers.0.self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(attn.qkv_proj.stored.dequantize(), qkv)
    # q, k and v each keep their own weight_scale_2, row by row
    scales = attn.qkv_proj.stored.global_scale
    assert len(set(scales.tolist())) == 3
    up = torch.cat([expected[f"model.layers.1.mlp.{p}.weight"] for p in ("gate_proj", "up_proj")])
    assert torch.equal(model.layers[1].mlp.gate_up_proj.stored.dequantize(), up)
    assert attn.qkv_proj.stored.input_scale.item() == 0.5


def test_modelopt_checkpoint_computes_like_its_dequantized_float_copy(modelopt_checkpoint, monkeypatch):
    # The exact weight-only path (W4A16), so this pins the loader; the CPU W4A8 kernel has its own tests.
    monkeypatch.setattr(cpu_linear, "nvfp4", lambda x, w: None)
    path, dequantized_dir, _ = modelopt_checkpoint
    quantized, reference = make_llm(path), make_llm(dequantized_dir)
    for prompt in PROMPTS:
        a, b = next_logprobs(quantized, prompt), next_logprobs(reference, prompt)
        assert [t for t, _ in a] == [t for t, _ in b]
        assert max(abs(x - y) for (_, x), (_, y) in zip(a, b)) < 1e-4


def test_legacy_hf_quant_config_alone_is_detected(modelopt_checkpoint, tmp_path):
    path, _, _ = modelopt_checkpoint
    shutil.copytree(path, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    (tmp_path / "m" / "hf_quant_config.json").write_text(json.dumps({
        "producer": {"name": "modelopt", "version": "0.19.0"},
        "quantization": {"quant_algo": "NVFP4", "kv_cache_quant_algo": None, "group_size": 16,
                         "exclude_modules": ["lm_head"]}}))
    llm = make_llm(tmp_path / "m")
    assert isinstance(llm.engine.core.model.layers[1].self_attn.o_proj.stored, NVFP4Weight)


def test_unsupported_modelopt_algorithm_is_a_clear_error(modelopt_checkpoint, tmp_path):
    path, _, _ = modelopt_checkpoint
    shutil.copytree(path, tmp_path / "m")
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"]["quant_algo"] = "W4A8_AWQ"
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported ModelOpt quant_algo 'W4A8_AWQ'"):
        make_llm(tmp_path / "m")


@pytest.mark.parametrize("fmt", list(QUANTIZED_FORMATS))
def test_quantize_round_trips_through_the_checkpoint(fmt, tiny_model, tmp_path):
    src = tiny_model("llama")
    out = quantize_checkpoint(str(src), tmp_path / fmt, fmt, dtype="float32")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == ("modelopt" if fmt == "nvfp4" else "tokenfab")
    assert config["ignore"] == ["lm_head"]
    tensors = load_file(str(out / "model.safetensors"))
    assert "model.layers.0.self_attn.q_proj.weight_scale" in tensors  # unfused, HF-named
    if fmt == "nvfp4":
        assert json.loads((out / "hf_quant_config.json").read_text())["quantization"]["quant_algo"] == "NVFP4"
        assert tensors["model.layers.0.self_attn.q_proj.weight_scale_2"].shape == ()
        assert tensors["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    loaded = make_llm(out)
    at_load = make_llm(src, quantization=fmt, quantization_exclude=["lm_head"])
    stored = loaded.engine.core.model.layers[0].mlp.gate_up_proj.stored
    direct = at_load.engine.core.model.layers[0].mlp.gate_up_proj.stored
    assert type(stored) is type(direct) and stored.nbytes == direct.nbytes
    assert torch.equal(stored.dequantize(), direct.dequantize())
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    assert [o.outputs[0].token_ids for o in loaded.generate(PROMPTS, params)] == \
        [o.outputs[0].token_ids for o in at_load.generate(PROMPTS, params)]
    assert "checkpoint " + fmt in loaded.engine.core.quantization_label


def test_tied_lm_head_and_mixed_formats(tiny_model, tmp_path):
    src = tiny_model("gemma3")  # tied embeddings
    out = quantize_checkpoint(str(src), tmp_path / "mixed", "int4", exclude=(), overrides=("lm_head=int8",),
                              dtype="float32")
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    assert config["format"] == "int4" and config["layers"] == {"lm_head": "int8"} and config["ignore"] == []
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["lm_head.weight"].dtype == torch.int8 and tensors["model.embed_tokens.weight"].dtype == torch.float32
    model = make_llm(out).engine.core.model
    assert isinstance(model.lm_head.stored, Int8Weight)
    assert isinstance(model.layers[0].self_attn.qkv_proj.stored, Int4Weight)
    assert model.embed_tokens.weight.dtype == torch.float32
    direct = Int8Weight.quantize(load_file(str(src / "model.safetensors"))["model.embed_tokens.weight"])
    assert torch.equal(model.lm_head.stored.qweight, direct.qweight)


def test_quantize_command_writes_a_loadable_checkpoint(tiny_model, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tokenfab.cli", "quantize", str(tiny_model("qwen3")),
                           str(tmp_path / "q"), "--format", "nvfp4"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert {"config.json", "hf_quant_config.json", "model.safetensors", "tokenizer.json"} <= \
        {p.name for p in (tmp_path / "q").iterdir()}
    assert json.loads((tmp_path / "q" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    llm = make_llm(tmp_path / "q")
    assert isinstance(llm.engine.core.model.layers[0].mlp.down_proj.stored, NVFP4Weight)
    assert len(llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))[0]
               .outputs[0].token_ids) == 4
    again = subprocess.run([sys.executable, "-m", "tokenfab.cli", "quantize", str(tmp_path / "q"),
                            str(tmp_path / "q2"), "--format", "int4"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 2 and "already quantized" in again.stderr
