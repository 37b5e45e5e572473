"""`tokenfab bench`: serve (one point), sweep (many points, several systems), report, ladder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parser(sub) -> None:
    bench = sub.add_parser("bench", help="measure any OpenAI-compatible server: latency, throughput, $/Mtok")
    cmds = bench.add_subparsers(dest="bench_command", required=True)
    one = cmds.add_parser("serve", help="one load point against a running server")
    _target(one, launch=False)
    add_workload_args(one)
    add_load_args(one)
    one.add_argument("--concurrency", type=int, default=None)
    one.add_argument("--rate", type=float, default=None, help="open loop: requests per second")
    one.add_argument("--out", type=Path, default=Path("results/bench-serve.json"))
    one.set_defaults(func=_serve)
    sw = cmds.add_parser("sweep", help="a concurrency or rate sweep, one or several systems, with a report")
    _target(sw, launch=True)
    add_workload_args(sw)
    add_load_args(sw)
    sw.add_argument("--concurrency", default=None, help="comma list, e.g. 1,2,4,8")
    sw.add_argument("--rate", default=None, help="comma list of request rates (open loop)")
    sw.add_argument("--out", type=Path, default=Path("results/sweep"), help="directory for JSON, Markdown, PNGs")
    sw.set_defaults(func=_sweep)
    rep = cmds.add_parser("report", help="Markdown + PNG report from sweep JSON files")
    rep.add_argument("files", nargs="+", type=Path)
    rep.add_argument("--out", type=Path, default=Path("report"))
    rep.set_defaults(func=_report)
    lad = cmds.add_parser("ladder", help="tokens per dollar at an SLO: naive baseline, then each optimization")
    add_load_args(lad)
    lad.add_argument("--out", type=Path, default=Path("results/ladder"))
    lad.add_argument("--model", default=None, help="HF directory or .gguf (default: embedded Gemma 3 270M)")
    lad.add_argument("--concurrency", default="1,4,8", help="points searched for the best one within SLO")
    lad.add_argument("--sessions", type=int, default=16)
    lad.add_argument("--turns", type=int, default=4)
    lad.add_argument("--isl", type=int, default=128, help="tool output tokens per turn")
    lad.add_argument("--osl", type=int, default=32, help="reply tokens per turn")
    lad.add_argument(
        "--quantization",
        default="int4",
        choices=["none", "fp8", "int8", "int4", "nvfp4"],
        help="weight format of the last rung, on top of prefix caching ('none': no such rung)",
    )
    lad.add_argument(
        "--replicas",
        type=int,
        default=2,
        help="the replica rungs (round-robin, then KV-aware routing) split the machine into this many (1: none)",
    )
    lad.add_argument(
        "--kv-pool-gb",
        type=float,
        default=0.15,
        help="the KV-tier rungs: the engine's KV pool cut to this size, then the host-memory KV tier added (0: none)",
    )
    lad.add_argument(
        "--moe-model",
        default=None,
        help="the MoE rungs: this mixture-of-experts model over 2 expert-parallel ranks, then with EPLB (omit: none)",
    )
    lad.add_argument("--rungs", default=None, help="run only these rungs (comma-separated numbers from 1)")
    lad.set_defaults(func=_ladder, slo_ttft=5.0, slo_tpot=0.25)


def _target(p: argparse.ArgumentParser, launch: bool) -> None:
    p.add_argument("--url", default=None, help="base URL of a running OpenAI-compatible server")
    p.add_argument("--system", default=None, help="name to report the --url server under (default: from /v1/models)")
    if launch:
        p.add_argument(
            "--launch",
            default=None,
            help="start these servers in turn: tokenfab,vllm,llama.cpp; tokenfab-FORMAT serves --quantization FORMAT",
        )
        p.add_argument("--peers-dir", type=Path, default=Path(".peers"))
        p.add_argument("--server-threads", type=int, default=2)
        p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--model", default=None, help="tokenizer source: HF directory or .gguf (default: Gemma 3 270M)")


def add_workload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workload", default="random", choices=["random", "prefix", "agentic", "chat", "trace"])
    p.add_argument("--isl", type=int, default=1024, help="input length (random: uniform in [0.8, 1] x isl)")
    p.add_argument("--osl", type=int, default=128)
    p.add_argument("--num-prefixes", type=int, default=4)
    p.add_argument("--prefix-len", type=int, default=512)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--think-time", type=float, default=0.5)
    p.add_argument("--trace", type=Path, default=None, help="JSONL trace for --workload trace")
    p.add_argument("--seed", type=int, default=0)


def add_load_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--num-requests", type=int, default=0, help="per point (default: max(8, 2 x concurrency))")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--max-duration", type=float, default=None, help="seconds per point")
    p.add_argument("--burstiness", type=float, default=1.0, help="open loop gamma shape (1 = Poisson)")
    p.add_argument("--price-per-hour", type=float, default=None, help="device $/h (default: 0.045 x cores)")
    p.add_argument(
        "--power-watts",
        type=float,
        default=None,
        help="client-side power model for servers that report no energy (default: 6 W x cores)",
    )
    p.add_argument("--slo-ttft", type=float, default=2.0)
    p.add_argument("--slo-tpot", type=float, default=0.1)
    p.add_argument("--request-timeout", type=float, default=600.0)


def _require_extra() -> None:
    """The harness's progress bars and plots come with the bench extra."""
    import importlib.util

    missing = [m for m in ("rich", "matplotlib") if importlib.util.find_spec(m) is None]
    if missing:
        raise RuntimeError(f"tokenfab bench needs {' and '.join(missing)}: pip install 'tokenfab[bench]'")


def _serve(args: argparse.Namespace) -> int:
    _require_extra()
    from tokenfab.bench import runner

    if args.url is None:
        raise ValueError("--url is required")
    if (args.concurrency is None) == (args.rate is None):
        raise ValueError("give --concurrency or --rate")
    points = [args.rate] if args.rate is not None else [args.concurrency]
    doc = runner.sweep_urls(args, points, args.rate is not None, args.out)
    runner.print_summary(doc)
    print(f"wrote {args.out}", file=sys.stderr)
    return runner.exit_code(doc)


def _sweep(args: argparse.Namespace) -> int:
    _require_extra()
    from tokenfab.bench import report, runner

    if (args.concurrency is None) == (args.rate is None):
        raise ValueError("give --concurrency or --rate (comma lists)")
    open_loop = args.rate is not None
    points = [float(x) for x in args.rate.split(",")] if open_loop else [int(x) for x in args.concurrency.split(",")]
    json_path = args.out / "sweep.json"
    if args.launch:
        doc = runner.sweep_launched(args, points, open_loop, json_path)
    elif args.url:
        doc = runner.sweep_urls(args, points, open_loop, json_path)
    else:
        raise ValueError("give --url or --launch")
    paths = report.write_report(doc, args.out)
    runner.print_summary(doc)
    print(f"wrote {', '.join(str(p) for p in paths.values())}", file=sys.stderr)
    return runner.exit_code(doc)


def _report(args: argparse.Namespace) -> int:
    _require_extra()
    from tokenfab.bench import report

    doc = report.merge(report.load_runs(args.files))
    paths = report.write_report(doc, args.out)
    print("\n".join(str(p) for p in paths.values()))
    return 0


def _ladder(args: argparse.Namespace) -> int:
    _require_extra()
    from tokenfab.bench import ladder

    return ladder.main(args)
