"""`tokenfab generate` end to end in a subprocess."""

import subprocess
import sys

from tokenfab import LLM, SamplingParams


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
