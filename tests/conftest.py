import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import write_tiny_model  # noqa: E402

torch.set_num_threads(2)

LANES = {
    "unit": ["test_admission", "test_autoscaler", "test_bench_launch", "test_bench_report", "test_bench_stats", "test_bench_workloads", "test_block_pool",
             "test_cost_meter", "test_disagg_router", "test_eplb", "test_guard", "test_router_migration", "test_router_policies", "test_tool_calls",
             "test_cpu_isa", "test_cpu_kernels", "test_gguf_loader", "test_kv_cache_manager", "test_kv_tiers", "test_quant_formats",
             "test_quant_triton", "test_scheduler", "test_spec_scheduler"],
    "engine": ["test_cpu_decode", "test_engine_tiny", "test_kv_events", "test_kv_tiers_engine", "test_kv_transfer", "test_moe", "test_planner", "test_simulator", "test_migration", "test_prompt_logprobs", "test_quant_checkpoint", "test_quant_gguf_packed",
               "test_quant_model", "test_spec_engine", "test_spec_policy", "test_spec_rollback", "test_spec_sampling"],
    "server": ["test_bench_live", "test_cli", "test_disaggregation", "test_engine_transports", "test_expert_parallel", "test_replica_faults", "test_replicas", "test_server", "test_server_abuse",
               "test_server_fuzz",
               "test_server_load", "test_server_spec"],
    "real_model": ["test_gemma_real", "test_quant_gemma", "test_server_gemma", "test_spec_gemma",
                   "test_structured_output", "test_tools_gemma"],
}
"""Test files by lane: unit (no model), engine (tiny random-weight models in process), server (HTTP, processes),
real_model (Gemma 3 270M's real weights). A test marked slow runs in real_model whatever its file."""
_LANE_OF = {stem: lane for lane, stems in LANES.items() for stem in stems}


def pytest_collection_modifyitems(config, items):
    for item in items:
        stem = Path(str(item.fspath)).stem
        lane = "real_model" if item.get_closest_marker("slow") else _LANE_OF.get(stem)
        if lane is None:
            raise pytest.UsageError(f"{stem}.py is in no lane: add it to LANES in tests/conftest.py")
        item.add_marker(getattr(pytest.mark, lane))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """kind -> path of a random-weight HF checkpoint, written once per session."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = write_tiny_model(kind, tmp_path_factory.mktemp(kind))
        return made[kind]

    return get


@pytest.fixture(scope="session")
def gemma_server():
    """`tokenfab serve` on the real default model, shared by the real-model tests that only send it requests."""
    from live_server import LiveServer

    server = LiveServer(None, "--kv-cache-memory-gb", "0.25")
    yield server
    assert server.stop() == 0


@pytest.fixture(scope="session")
def hf_model():
    """kind-or-path -> transformers model in fp32 (cached per session)."""
    import transformers

    cache = {}

    def get(path: Path):
        if path not in cache:
            cache[path] = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]

    return get


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation with its own KV cache; EOS is an ordinary token (like ignore_eos)."""
    out: list[int] = []
    with torch.no_grad():
        step = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            out.append(int(step.logits[0, -1].argmax()))
            step = model(torch.tensor([[out[-1]]]), past_key_values=step.past_key_values, use_cache=True)
    return out


TINY_LLM_OPTIONS = dict(dtype="float32", kv_cache_memory_gb=0.02, max_model_len=1024, max_num_batched_tokens=64)


def tiny_llm(path, **options):
    """An LLM over a tiny checkpoint: fp32, a small KV cache and step budget (chunked prefills, preemption); any
    EngineConfig field can be overridden."""
    from tokenfab import LLM

    return LLM(str(path), **{**TINY_LLM_OPTIONS, **options})


def random_prompts(lengths, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]
