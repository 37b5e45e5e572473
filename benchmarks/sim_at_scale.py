"""Scale on paper: a simulated fleet of 100+ GPU replicas behind the kv router, sized by the simulator for a
published traffic shape. Everything here is simulated and modelled: H100 step costs from the roofline
(`tokenfab/sim/roofline.py`), Llama 3 8B's shapes (from its published config.json), and the conversation traffic of
the Azure LLM inference trace 2023 as Splitwise (Patel et al., ISCA 2024) summarizes it: median prompt 1,020 tokens,
median output 129. The prompts and outputs are drawn log-normal around those medians (the trace itself is not
used), arrivals Poisson. The real scheduler and KV cache manager run every replica; the real kv policy routes.

    .venv/bin/python benchmarks/sim_at_scale.py                 # ~10 min on 2 cores
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import asdict
from pathlib import Path

from tokenfab.bench.records import SLO
from tokenfab.bench.sweep import SweepConfig, Workload
from tokenfab.models.arch import arch_from_hf_config
from tokenfab.platform import cpu_isa, machine
from tokenfab.platform.prices import PROFILES
from tokenfab.sim.planner import Variant, evaluate
from tokenfab.sim.roofline import GPUS, roofline_cost, roofline_shape
from tokenfab.sim.run import SimLoad
from tokenfab.sim.simulator import ReplicaShape

LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336,
             "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
             "max_position_embeddings": 8192, "rope_theta": 500000.0, "tie_word_embeddings": False}  # fmt: skip
PROMPT_MEDIAN, OUTPUT_MEDIAN, SIGMA = 1020, 129, 0.7


def traffic(rate: float, seconds: float, seed: int) -> tuple[list[tuple[list[int], int]], list[float | None]]:
    rng, t, requests, arrivals = random.Random(seed), 0.0, [], []
    while True:
        t += rng.expovariate(rate)
        if t >= seconds:
            return requests, arrivals
        n_in = min(7000, max(16, int(rng.lognormvariate(math.log(PROMPT_MEDIAN), SIGMA))))
        n_out = min(1000, max(1, int(rng.lognormvariate(math.log(OUTPUT_MEDIAN), SIGMA))))
        # Distinct token ids per request (no prefix shared: the trace has no session structure to reuse).
        base = rng.randrange(1000, 100000)
        requests.append(([1000 + (base + 7 * j) % 120000 for j in range(n_in)], n_out))
        arrivals.append(t)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=1100.0, help="requests per second, the whole fleet")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--replicas", default="90,100,110")
    ap.add_argument("--gpu", default="h100", choices=list(GPUS))
    ap.add_argument("--slo-ttft", type=float, default=2.0)
    ap.add_argument("--slo-tpot", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=Path(f"benchmarks/reports/sim-at-scale-{time.strftime('%Y-%m-%d')}"))
    args = ap.parse_args()
    arch = arch_from_hf_config(LLAMA3_8B)
    price = PROFILES[args.gpu].usd_per_hour
    shape = roofline_shape(GPUS[args.gpu], arch, ReplicaShape([None], [1], 16, 256, 8192, 8192))
    variant = Variant(f"{args.gpu} (modelled)", roofline_cost(GPUS[args.gpu], arch, price), shape, price, modelled=True)
    requests, arrivals = traffic(args.rate, args.seconds, args.seed)
    config = SweepConfig([args.rate], True, len(requests), 0, slo=SLO(args.slo_ttft, args.slo_tpot))
    load = SimLoad(config, Workload("azure-conversation-shape", {}), args.rate, True, requests, arrivals)
    rows = []
    for k in (int(x) for x in args.replicas.split(",")):
        started = time.monotonic()
        c = evaluate(load, variant, k, shape.max_num_seqs)
        rows.append({**asdict(c), "wall_s": round(time.monotonic() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
    doc = {
        "note": "simulated fleet; H100 step costs from a roofline model (modelled); traffic shaped after the Azure LLM "
        "inference trace 2023 (conversation) medians as published in Splitwise, not the trace itself",
        "planned_on": {**machine.describe(), **cpu_isa.describe()},
        "model": "Llama 3 8B shapes (bf16)",
        "step_cost": variant.cost.coef,
        "kv_blocks_per_replica": shape.blocks_per_group,
        "rate": args.rate, "seconds": args.seconds, "requests": len(requests),
        "prompt_tokens_mean": sum(len(p) for p, _ in requests) / len(requests),
        "output_tokens_mean": sum(n for _, n in requests) / len(requests),
        "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
        "rows": rows,
    }  # fmt: skip
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def markdown(doc: dict) -> str:
    meeting = [r for r in doc["rows"] if r["meets_slo"]]
    best = min(meeting, key=lambda r: r["replicas"]) if meeting else None
    lines = [
        "# Scale on paper: a simulated fleet of 100+ H100 replicas (modelled)",
        "",
        f"Simulated, not run: {doc['model']} on H100s whose step costs come from the roofline model "
        "(`tokenfab/sim/roofline.py`: bandwidth x 0.7, bf16 FLOP/s x 0.4, launches per layer), the real scheduler and "
        "KV cache manager per replica and the real kv routing policy in front. Traffic: the shape of the Azure LLM "
        "inference trace 2023 (conversation) as Splitwise (Patel et al., ISCA 2024) reports its medians (prompt "
        f"1,020 tokens, output 129), drawn log-normal around them (means {doc['prompt_tokens_mean']:.0f} / "
        f"{doc['output_tokens_mean']:.0f}), Poisson arrivals at {doc['rate']:g} requests/s for {doc['seconds']:g} s "
        f"({doc['requests']} requests). SLO: TTFT <= {doc['slo']['ttft_s']:g} s and TPOT <= {doc['slo']['tpot_s']:g}"
        f" s for >= 90% of requests. Planned on {doc['planned_on']['cpu']}. Command: `.venv/bin/python "
        "benchmarks/sim_at_scale.py`.",
        "",
        "| H100 replicas | $/h | meets SLO | TTFT p50 / p90 | TPOT p50 | output tok/s | $/Mtok out | simulated in |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        lines.append(
            f"| {r['replicas']} | {r['usd_per_hour']:.0f} | {'yes' if r['meets_slo'] else 'no'} "
            f"({r['goodput_fraction']:.0%}) | {r['ttft_p50_s'] * 1000:.0f} / {r['ttft_p90_s'] * 1000:.0f} ms | "
            f"{r['tpot_p50_s'] * 1000:.1f} ms | {r['output_tok_s']:.0f} | {r['usd_per_mtok_output']:.3f} | "
            f"{r['wall_s']:.0f} s |"
        )
    lines += ["", f"Fewest replicas meeting the SLO: **{best['replicas']}**." if best else "None meets the SLO.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
