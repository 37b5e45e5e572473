"""Simulated load: the bench's workload and load flags made into token requests once, then run on any simulated
deployment; `simulate_point` turns one run into the bench's report document."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

from tokenfab.bench import runner
from tokenfab.bench.load import LoadPlan
from tokenfab.bench.stats import Summary, summarize
from tokenfab.bench.sweep import SweepConfig, Workload, new_document, requests_for
from tokenfab.cluster.policies import RoutingPolicy, make_policy
from tokenfab.sim.simulator import ReplicaShape, SessionTokens, Simulator, closed_loop, open_loop, sessions_loop
from tokenfab.sim.step_cost import StepCostModel


def shape_of(cost: StepCostModel, replicas: int = 1, max_num_seqs: int | None = None) -> ReplicaShape:
    """The profiled engine's pools and limits, its KV split over `replicas` (as `serve --replicas` splits it);
    `max_num_seqs` overrides the profiled batch limit."""
    s = cost.meta["shape"]
    blocks = [max(2, (b - 1) // replicas + 1) for b in s["blocks_per_group"]]
    return ReplicaShape(
        s["windows"],
        blocks,
        s["block_size"],
        max_num_seqs or s["max_num_seqs"],
        s["max_num_batched_tokens"],
        s["max_model_len"],
        cost.meta.get("usd_per_hour", 0.0),
    )


@dataclass(slots=True)
class SimLoad:
    """One load point in tokens, ready to replay on any deployment."""

    config: SweepConfig
    workload: Workload
    point: float
    """Concurrency (closed loop) or request rate (open loop)."""
    open_loop: bool
    requests: list[tuple[list[int], int]] = field(default_factory=list)
    """(prompt, max_tokens), warm-up requests first."""
    arrivals: list[float | None] = field(default_factory=list)
    """A trace's own arrival times (None: drawn at the rate)."""
    sessions: list[SessionTokens] = field(default_factory=list)
    warmup: int = 0


def prepare_load(args: argparse.Namespace) -> SimLoad:
    """The workload and load flags of `tokenfab bench serve` as token requests (prompts tokenized as the server
    would). A trace given without --rate or --concurrency keeps its own arrival times."""
    from tokenfab.models.loading import load_tokenizer, resolve_model

    own_times = args.workload == "trace" and args.rate is None and args.concurrency is None
    open_ = args.rate is not None or own_times
    point = (args.rate or 1.0) if open_ else args.concurrency
    config = runner.build_config(args, [point], open_)
    tok = load_tokenizer(resolve_model(args.model))  # once: the workload's text and its tokens
    workload = runner.build_workload(args, requests_for(config, point) + config.warmup, tok)
    n = requests_for(config, point, workload)
    if workload.sessions:
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
        return SimLoad(config, workload, point, open_, sessions=sessions)
    warm = 0 if own_times else config.warmup
    specs = workload.requests[: n + warm]
    requests = [(tok.encode(r.prompt), r.max_tokens) for r in specs]
    return SimLoad(config, workload, point, open_, requests, [r.arrival for r in specs], warmup=warm)


def run_load(
    load: SimLoad,
    cost: StepCostModel,
    shape: ReplicaShape,
    replicas: int = 1,
    policy: RoutingPolicy | None = None,
    price_per_hour: float | None = None,
) -> tuple[Summary, Simulator]:
    """Run the load on `replicas` replicas of `shape` (a routing policy when there are several) and summarize it
    as a measured run would be, priced at `price_per_hour` for the whole deployment (default: the config's)."""
    sim = Simulator(shape, cost, replicas, policy if replicas > 1 else None)
    if load.sessions:
        sessions_loop(sim, load.sessions, int(load.point))
    elif load.open_loop:
        # As a measured run: the warm-up requests are sent but not recorded; arrival times drawn with the load
        # generator's seed (LoadPlan's default), so both see the same arrivals.
        open_loop(sim, load.requests, float(load.point), load.config.burstiness, LoadPlan(rate=1.0).seed,
                  load.warmup, load.arrivals)  # fmt: skip
    else:
        closed_loop(sim, load.requests, int(load.point), load.warmup)
    sim.run()
    records = sorted(sim.records, key=lambda r: r.start)
    c = load.config
    price = c.price_per_hour if price_per_hour is None else price_per_hour
    return summarize(records, price_per_hour=price, slo=c.slo, power_watts=c.power_watts), sim


def simulate_point(args: argparse.Namespace) -> dict:
    cost = StepCostModel.load(args.profile)
    load = prepare_load(args)
    policy = make_policy(args.router, seed=args.seed, slo_ttft=args.slo_ttft, slo_tpot=args.slo_tpot)
    summary, sim = run_load(load, cost, shape_of(cost, args.replicas), args.replicas, policy)
    doc = new_document(load.workload, load.config, None)
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
                    "concurrency": None if load.open_loop else load.point,
                    "rate": load.point if load.open_loop else None,
                    "wall_s": sim.now,
                    "summary": summary.as_dict(),
                }
            ],
        }
    )
    return doc
