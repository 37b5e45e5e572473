"""`tokenfab profile` (measure this machine's step costs), `tokenfab simulate` (a load point in virtual time, with the
same workload flags and the same JSON report shape as `tokenfab bench serve`) and `tokenfab plan` (the cheapest
deployment meeting an SLO at a load, searched in the simulator)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def add_parsers(sub) -> None:
    from tokenfab.bench.cli import add_load_args, add_workload_args
    from tokenfab.cluster.policies import POLICIES
    from tokenfab.config_cli import add_engine_args

    prof = sub.add_parser("profile", help="measure an engine's step times on this machine and fit a step-cost model")
    add_engine_args(prof)
    prof.add_argument("--out", type=Path, default=Path("prof"), help="directory for step_cost.json")
    prof.add_argument(
        "--calibrate",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="then serve the same config for a minute to measure what serving adds to a step and a request",
    )
    prof.set_defaults(func=_profile)

    sim = sub.add_parser("simulate", help="a load point in virtual time: the real scheduler, a measured step cost")
    sim.add_argument("--profile", type=Path, required=True, help="a `tokenfab profile` directory (per replica)")
    sim.add_argument("--model", default=None, help="tokenizer source: HF directory or .gguf (default: Gemma 3 270M)")
    add_workload_args(sim)
    add_load_args(sim)
    sim.add_argument("--concurrency", type=int, default=None)
    sim.add_argument("--rate", type=float, default=None, help="open loop: requests per second")
    sim.add_argument("--replicas", type=int, default=1, help="replicas, each as profiled (KV split evenly)")
    sim.add_argument("--router", default="kv", choices=list(POLICIES))
    sim.add_argument("--out", type=Path, default=Path("results/simulate.json"))
    validate_help = (
        "instead: measure held-out configurations against `tokenfab serve` (the profile's engine flags), simulate "
        "each, report the errors (--out .json and .md; ~10 min on a quiet machine)"
    )
    sim.add_argument("--validate", action="store_true", help=validate_help)
    sim.set_defaults(func=_simulate)

    plan = sub.add_parser("plan", help="the cheapest deployment meeting an SLO at a load (searched in the simulator)")
    plan.add_argument("--profile", type=Path, action="append", required=True,
                      help="a `tokenfab profile` directory: one replica variant each (repeat for several)")  # fmt: skip
    plan.add_argument("--model", default=None, help="tokenizer and shapes: HF directory or .gguf (default: Gemma)")
    add_workload_args(plan)
    add_load_args(plan)
    plan.add_argument("--concurrency", type=int, default=None)
    plan.add_argument("--rate", type=float, default=None, help="open loop: requests per second")
    plan.add_argument("--devices", default="l4,a100,h100,h200",
                      help="GPU kinds with roofline step costs (labelled modelled); 'none' for none")  # fmt: skip
    plan.add_argument("--max-replicas", type=int, default=8)
    plan.add_argument("--max-num-seqs", default=None,
                      help="batch limits to try, comma-separated (default: 16, 32 and the profile's on a CPU; "
                      "64, 256 on a GPU)")  # fmt: skip
    plan.add_argument("--router", default="kv", choices=list(POLICIES))
    plan.add_argument("--attainment", type=float, default=0.9, help="share of requests that must meet the SLO")
    plan.add_argument("--out", type=Path, default=Path("plan"), help="directory for plan.json, plan.md, frontier.png")
    plan.set_defaults(func=_plan)


def _profile(args: argparse.Namespace) -> int:
    import tempfile

    from tokenfab.config_cli import engine_config
    from tokenfab.sim.profile import calibrate, profile

    config = engine_config(args)
    model = profile(config, progress=lambda line: print(line, file=sys.stderr))
    if args.calibrate:
        with tempfile.TemporaryDirectory() as tmp:
            calibrate(model, _engine_flags(sys.argv), Path(tmp))
    model.meta["serve_flags"] = _engine_flags(sys.argv)
    path = model.save(args.out)
    print(json.dumps({"coef": model.coef, "serving_step_s": model.serving_step_s,
                      "request_latency_s": model.request_latency_s,
                      "busy_request_latency_s": model.busy_request_latency_s,
                      "median_rel_error": model.meta["median_rel_error"]}, indent=1))  # fmt: skip
    print(f"wrote {path}", file=sys.stderr)
    return 0


def _engine_flags(argv: list[str]) -> list[str]:
    """The engine flags `tokenfab profile` was given (what the calibration server is started with)."""
    rest = argv[argv.index("profile") + 1 :] if "profile" in argv else []
    out, skip = [], False
    for a in rest:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not (a.startswith("--out=") or a in ("--calibrate", "--no-calibrate")):
            out.append(a)
    return out


def _simulate(args: argparse.Namespace) -> int:
    from tokenfab.bench import runner
    from tokenfab.sim.run import simulate_point

    if args.validate:
        from tokenfab.sim.validate import markdown, validate

        doc = validate(args.profile, args.out, model=args.model)
        print(markdown(doc, args.profile))
        print(f"wrote {args.out.with_suffix('.json')} and .md", file=sys.stderr)
        return 0
    if (args.concurrency is None) == (args.rate is None):
        raise ValueError("give --concurrency or --rate")
    started = time.monotonic()
    doc = simulate_point(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(doc, indent=1))
    runner.print_summary(doc)
    point = doc["systems"][0]["points"][0]
    print(f"simulated {point['wall_s']:.1f} s in {time.monotonic() - started:.2f} s; wrote {args.out}", file=sys.stderr)
    return 0


def _plan(args: argparse.Namespace) -> int:
    from tokenfab.sim.plan_report import plan_document, variants, write
    from tokenfab.sim.planner import search
    from tokenfab.sim.run import prepare_load

    if args.concurrency is not None and args.rate is not None:
        raise ValueError("give --concurrency or --rate, not both")
    if args.concurrency is None and args.rate is None and args.workload != "trace":
        raise ValueError("give --concurrency, --rate or a --trace with its own arrival times")
    limits = [int(x) for x in args.max_num_seqs.split(",")] if args.max_num_seqs else None
    found = variants(args.profile, args.model, [d for d in args.devices.split(",") if d not in ("", "none")], limits)
    load = prepare_load(args)
    started = time.monotonic()
    result = search(
        load, found, args.max_replicas, args.router, args.attainment,
        progress=lambda c: print(f"  {c.variant} x{c.replicas} max_num_seqs {c.max_num_seqs}: "
                                 f"{'meets' if c.meets_slo else 'misses'} the SLO ({c.goodput_fraction:.0%})",
                                 file=sys.stderr),
    )  # fmt: skip
    doc = plan_document(args, load, found, result, time.monotonic() - started)
    paths = write(doc, args.out)
    print(paths["md"].read_text())
    print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    return 0 if result.best is not None else 1
