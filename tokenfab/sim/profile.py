"""Profile: measure an engine's step times over a grid of batches (prompt lengths x sequences at once) and fit a
`StepCostModel` to them. The engine is the real one, in this process, with the config the server would use."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from tokenfab.config import EngineConfig
from tokenfab.engine.core import EngineCore
from tokenfab.engine.messages import CoreRequest
from tokenfab.engine.scheduler import StepUpdate
from tokenfab.engine.types import SamplingParams
from tokenfab.sim.step_cost import StepCostModel, StepFeatures, machine_meta

GRID = [(64, 1), (64, 8), (256, 1), (256, 4), (256, 16), (1024, 1), (1024, 4), (1024, 12), (2048, 2), (512, 32)]
"""(prompt tokens, sequences at once): short and long prompts, decoding alone and in large batches."""


def profile(
    config: EngineConfig, grid: list[tuple[int, int]] = GRID, max_tokens: int = 48,
    progress: Callable[[str], None] | None = None,
) -> StepCostModel:  # fmt: skip
    core = EngineCore(config)
    plans: list[StepUpdate] = []
    core.scheduler.hooks.append(plans.append)
    rng = random.Random(0)
    vocab = core.arch.vocab_size
    limit = core.max_model_len - max_tokens - 1
    samples: list[tuple[StepFeatures, float]] = []
    for n, (prompt_len, seqs) in enumerate(grid):
        length = min(prompt_len, limit)
        for i in range(seqs):
            # Random ids past the first thousand (control tokens; half of a tiny vocabulary): no prefix is shared,
            # every prompt is computed.
            prompt = [rng.randrange(min(1000, vocab // 2), vocab) for _ in range(length)]
            params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
            core.add_request(CoreRequest(f"p{n}-{i}", prompt, params, time.monotonic()))
        while core.has_unfinished():
            plans.clear()
            started = time.perf_counter()
            core.step()
            seconds = time.perf_counter() - started
            if plans:
                samples.append((StepFeatures.of(plans[0].plan), seconds))
        if progress is not None:
            progress(f"{length}-token prompts x {seqs}: {len(samples)} steps measured")
    pools = core.kv.pools
    meta = {
        **machine_meta(),
        "model": core.source.path.name,
        "weights": core.quantization_label,
        "dtype": str(core.dtype),
        "threads": config.threads,
        "shape": {
            "windows": list(core.kv.windows),
            "blocks_per_group": [p.num_blocks for p in pools],
            "block_size": config.block_size,
            "max_num_seqs": config.max_num_seqs,
            "max_num_batched_tokens": config.max_num_batched_tokens,
            "max_model_len": core.max_model_len,
        },
        "kv_cache_memory_gb": config.kv_cache_memory_gb,
        "usd_per_hour": core.info().usd_per_hour,
    }
    core.close()
    return StepCostModel.fit(samples, meta)


def calibrate(model: StepCostModel, serve_flags: list[str], log_dir: Path) -> dict:
    """Serve with the profiled config and measure what serving adds: one request at a time (256-token prompts, 64
    tokens out) for what a served step takes beyond the engine's own time and what a request spends before the
    engine has it while the engine is idle, then 8 at a time for that latency while the engine is busy (the front end
    shares the machine with it). A request's front-end time is the client's TTFT less the server's own TTFT
    histogram. All go into the model (`serving_step_s`, `request_latency_s`, `busy_request_latency_s`); returns the
    measurement."""
    from tokenfab.bench.launch import ServerSpec, free_port, launch

    port = free_port()
    server = launch(
        ServerSpec("tokenfab", [sys.executable, "-m", "tokenfab.cli", "serve", "--port", str(port), *serve_flags],
                   dict(os.environ)),
        port,
        log_dir,
    )  # fmt: skip

    def run(concurrency: int, requests: int) -> tuple[dict, float]:
        """The bench summary and the server's mean TTFT over the same requests."""
        out = log_dir / f"calibration-{concurrency}.json"
        before = _served_ttft(server.url)
        subprocess.run(
            [sys.executable, "-m", "tokenfab.cli", "bench", "serve", "--url", server.url, "--workload", "random",
             "--isl", "256", "--osl", "64", "--concurrency", str(concurrency), "--num-requests", str(requests),
             "--seed", "991", "--out", str(out)],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        after = _served_ttft(server.url)
        s = json.loads(out.read_text())["systems"][0]["points"][0]["summary"]
        count = after[1] - before[1]
        return s, (after[0] - before[0]) / count if count else s["ttft_s"]["mean"]

    try:
        idle, idle_served = run(1, 8)
        busy, busy_served = run(8, 32)
    finally:
        server.stop()
    prompt = idle["input_tokens"] / max(idle["completed"], 1)
    tpot, ttft = idle["tpot_s"]["p50"], idle["ttft_s"]["p50"]
    decode = model.engine_seconds(StepFeatures(decode_seqs=1, decode_context=int(prompt + 32)))
    prefill = model.engine_seconds(StepFeatures(int(prompt), int(prompt) * prompt / 2 / 1000))
    model.serving_step_s = max(0.0, tpot - decode)
    model.request_latency_s = max(0.0, idle["ttft_s"]["mean"] - idle_served)
    model.busy_request_latency_s = max(0.0, busy["ttft_s"]["mean"] - busy_served)
    measured = {"tpot_p50": tpot, "ttft_p50": ttft, "ttft_mean": idle["ttft_s"]["mean"],
                "served_ttft_mean": idle_served, "busy_ttft_mean": busy["ttft_s"]["mean"],
                "busy_served_ttft_mean": busy_served, "prompt_tokens": prompt, "predicted_decode_step": decode,
                "predicted_prefill_step": prefill}  # fmt: skip
    model.meta["calibration"] = measured
    return measured


def _served_ttft(url: str) -> tuple[float, float]:
    """(sum, count) of the server's time-to-first-token histogram."""
    import re

    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    values = []
    for kind in ("sum", "count"):
        found = re.search(rf"^tokenfab:time_to_first_token_seconds_{kind}{{[^}}]*}} (\S+)$", text, re.M)
        values.append(float(found.group(1)) if found else 0.0)
    return values[0], values[1]
