"""`tokenfab generate` end to end in a subprocess."""

import subprocess
import sys
from dataclasses import fields

from tokenfab import LLM, SamplingParams
from tokenfab.cli import build_parser
from tokenfab.config import EngineConfig, PricingConfig, SpeculativeConfig
from tokenfab.config_cli import engine_config, field_docs


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tokenfab.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_prints_the_same_text_as_the_api(tiny_model):
    path = str(tiny_model("llama"))
    proc = run_cli("generate", "w5 w6 w7 w8", "--model", path, "--max-tokens", "6", "--dtype", "float32",
                   "--max-model-len", "256", "--kv-cache-memory-gb", "0.01")
    assert proc.returncode == 0, proc.stderr
    expected = LLM(path, dtype="float32", max_model_len=256, kv_cache_memory_gb=0.01).generate(
        "w5 w6 w7 w8", SamplingParams(max_tokens=6, temperature=0))[0].outputs[0]
    assert proc.stdout.strip() == expected.text.strip()
    assert f"[{len(expected.token_ids)} tokens" in proc.stderr


def test_missing_model_is_a_clear_error():
    proc = run_cli("generate", "hi", "--model", "/nonexistent/model")
    assert proc.returncode == 2
    assert "model not found" in proc.stderr and "Traceback" not in proc.stderr


def test_every_engine_config_field_is_a_flag_of_serve_generate_and_core():
    """Flags are derived from EngineConfig: their defaults give EngineConfig(), and each field is settable."""
    parser = build_parser()
    for argv in (["serve"], ["generate", "hi"], ["core", "--connect", "tcp://127.0.0.1:5555"]):
        assert engine_config(parser.parse_args(argv)) == EngineConfig()
    changed = ["--device", "cuda", "--block-size", "32", "--threads", "3", "--no-enable-prefix-caching",
               "--quantization", "int8", "--quantization-exclude", "lm_head", "--quantization-override", "x=int4",
               "--kv-events-endpoint", "tcp://*:5557", "--device-profile", "h100", "--usd-per-hour", "2.5",
               "--speculative", "ngram", "--num-speculative-tokens", "3", "--no-spec-adaptive", "--seed", "7"]
    for argv in (["serve", *changed], ["generate", "hi", *changed]):
        config = engine_config(parser.parse_args(argv))
        assert (config.device, config.block_size, config.num_threads, config.enable_prefix_caching) == \
            ("cuda", 32, 3, False)
        assert config.quantization_exclude == ("lm_head",) and config.quantization_overrides == ("x=int4",)
        assert config.kv_events_endpoint == "tcp://*:5557" and config.seed == 7
        assert config.pricing == PricingConfig(profile="h100", usd_per_hour=2.5)
        assert config.speculative == SpeculativeConfig("ngram", num_speculative_tokens=3, adaptive=False)
    scalar = [f.name for f in fields(EngineConfig) if f.name not in ("pricing", "speculative")]
    documented = field_docs(EngineConfig)
    assert [name for name in scalar if name not in documented] == []
    for argv in (["serve"], ["generate", "hi"]):
        dests = {k.removeprefix("EngineConfig.") for k in vars(parser.parse_args(argv))}
        assert [name for name in scalar if name not in dests] == []
