"""One simulated load point, from the bench's workload and load flags to the bench's report document."""

from __future__ import annotations

import argparse

from tokenfab.bench import runner
from tokenfab.bench.load import LoadPlan
from tokenfab.bench.stats import summarize
from tokenfab.bench.sweep import new_document, requests_for
from tokenfab.cluster.policies import make_policy
from tokenfab.sim.simulator import ReplicaShape, SessionTokens, Simulator, closed_loop, open_loop, sessions_loop
from tokenfab.sim.step_cost import StepCostModel


def shape_of(cost: StepCostModel, replicas: int) -> ReplicaShape:
    """The profiled engine's pools and limits, its KV split over `replicas` (as `serve --replicas` splits it)."""
    s = cost.meta["shape"]
    blocks = [max(2, (b - 1) // replicas + 1) for b in s["blocks_per_group"]]
    return ReplicaShape(
        s["windows"],
        blocks,
        s["block_size"],
        s["max_num_seqs"],
        s["max_num_batched_tokens"],
        s["max_model_len"],
        cost.meta.get("usd_per_hour", 0.0),
    )


def simulate_point(args: argparse.Namespace) -> dict:
    from tokenfab.models.loading import load_tokenizer, resolve_model

    cost = StepCostModel.load(args.profile)
    open_ = args.rate is not None
    point = args.rate if open_ else args.concurrency
    config = runner.build_config(args, [point], open_)
    agentic = args.workload == "agentic"
    workload = runner.build_workload(args, requests_for(config, point) + config.warmup)
    tok = load_tokenizer(resolve_model(args.model))
    policy = make_policy(args.router, seed=args.seed, slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot)
    sim = Simulator(shape_of(cost, args.replicas), cost, args.replicas, policy if args.replicas > 1 else None)
    n = requests_for(config, point, workload)
    warm = 0
    if agentic:
        sessions = [
            SessionTokens(
                s.session,
                tok.encode(s.system),
                [tok.encode("\n" + t, add_special_tokens=False) for t in s.tool_outputs],
                list(s.reply_tokens),
                s.think_time_s,
            )
            for s in workload.sessions[:n]
        ]
        sessions_loop(sim, sessions, int(point))
    else:
        warm = config.warmup
        specs = workload.requests[: n + warm]
        requests = [(tok.encode(r.prompt), r.max_tokens) for r in specs]
        # As a measured run: the warm-up requests are sent but not recorded; arrival times drawn with the load
        # generator's seed (LoadPlan's default), so both see the same arrivals.
        if open_:
            open_loop(sim, requests, float(point), config.burstiness, LoadPlan(rate=1.0).seed, warm,
                      [r.arrival for r in specs])  # fmt: skip
        else:
            closed_loop(sim, requests, int(point), warm)
    sim.run()
    records = sorted(sim.records, key=lambda r: r.start)
    summary = summarize(records, price_per_hour=config.price_per_hour, slo=config.slo, power_watts=config.power_watts)
    doc = new_document(workload, config, None)
    doc["kind"] = "tokenfab-simulate"
    doc["simulated"] = {
        "profile": str(args.profile),
        "profile_meta": {k: v for k, v in cost.meta.items() if k != "shape"},
        "replicas": args.replicas,
        "router": args.router if args.replicas > 1 else None,
        "note": "virtual time: the real scheduler and KV cache manager, step times from the fitted step-cost model",
    }
    doc["systems"].append(
        {
            "system": f"tokenfab (simulated, {args.replicas} replica{'s' if args.replicas > 1 else ''})",
            "status": "ok",
            "points": [
                {
                    "concurrency": None if open_ else point,
                    "rate": point if open_ else None,
                    "wall_s": sim.now,
                    "summary": summary.as_dict(),
                }
            ],
        }
    )
    return doc
