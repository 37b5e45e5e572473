"""Ramp test of the autoscaler on real replicas: `tokenfab serve --replicas auto` under a load that steps from a
trickle to more than one replica serves and back (0.2 -> 3 -> 0.2 requests/s by default), measured with `tokenfab
bench serve` (Poisson arrivals, a seeded trace). Reports the share of requests within the SLO, the replica time the
autoscaler paid for, and the planner's optimum for the same trace: per phase, the fewest replicas the simulator
(on this machine's per-replica profile) finds meeting the SLO at that phase's load, times the phase's length; and
what the fewest replicas meeting it for the whole trace would have cost standing.

    .venv/bin/python -m tokenfab.cli profile --threads 1 --kv-cache-memory-gb 1 --out benchmarks/profiles/<name>
    .venv/bin/python benchmarks/autoscale_ramp.py --profile benchmarks/profiles/<name>     # quiet machine, ~7 min

The server runs the profile's engine flags (a weight format given to `tokenfab profile`, say), so the replicas are
the variant the planner's optimum is computed for, and starts its replicas' step-cost fits from the profile
(`--step-profile`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from tokenfab.bench.launch import ServerSpec, free_port, launch
from tokenfab.platform import cpu_isa, machine

TOKENFAB = [sys.executable, "-m", "tokenfab.cli"]


def phases_arg(text: str) -> list[tuple[float, float]]:
    """'RATE:SECONDS,...'"""
    return [(float(r), float(s)) for r, s in (p.split(":") for p in text.split(","))]


def write_trace(path: Path, phases: list[tuple[float, float]], isl: int, osl: int, seed: int) -> list[int]:
    """Poisson arrivals at each phase's rate; returns the number of requests per phase."""
    rng, t, counts, lines = random.Random(seed), 0.0, [], []
    for rate, seconds in phases:
        end, n = t + seconds, 0
        t += rng.expovariate(rate)
        while t < end:
            lines.append(json.dumps({"timestamp": round(t, 3), "input_length": isl, "output_length": osl}))
            n += 1
            t += rng.expovariate(rate)
        counts.append(n)
        t = end
    path.write_text("\n".join(lines) + "\n")
    return counts


def watch(url: str, samples: list[dict], stop: threading.Event) -> None:
    start = time.monotonic()
    while not stop.is_set():
        try:
            doc = httpx.get(f"{url}/replicas", timeout=5).json()
            states = [r["state"] for r in doc["replicas"]]
            samples.append({"t": round(time.monotonic() - start, 1), "states": states,
                            "paid": sum(s not in ("stopped", "dead") for s in states),
                            "replica_seconds": doc["autoscaler"]["replica_seconds"],
                            "last": doc["autoscaler"]["last"]})  # fmt: skip
        except (httpx.HTTPError, KeyError, ValueError):
            pass
        stop.wait(1.0)


def planner_optimum(args: argparse.Namespace, trace: Path, phases: list[tuple[float, float]]) -> dict:
    """Per phase: the fewest replicas of the profiled variant the planner finds meeting the SLO at that phase's
    requests (the same trace slice, its own arrival times), and for the whole trace at once."""
    from tokenfab.sim.plan_report import variants
    from tokenfab.sim.planner import search
    from tokenfab.sim.run import prepare_load

    (variant,) = variants([args.profile], None, [])
    lines = trace.read_text().splitlines()
    out, t0 = [], 0.0
    for rate, seconds in phases:
        part = [json.loads(line) for line in lines if t0 <= json.loads(line)["timestamp"] < t0 + seconds]
        piece = trace.with_suffix(f".{len(out)}.jsonl")
        piece.write_text("\n".join(json.dumps(r) for r in part) + "\n")
        load = prepare_load(load_args(args, piece))
        plan = search(load, [variant], args.max_replicas, "kv", 0.9)
        out.append({"rate": rate, "seconds": seconds, "requests": len(part),
                    "replicas": plan.best.replicas if plan.best else None})  # fmt: skip
        t0 += seconds
    whole = search(prepare_load(load_args(args, trace)), [variant], args.max_replicas, "kv", 0.9)
    return {"phases": out, "whole_trace_replicas": whole.best.replicas if whole.best else None}


def profiled_flags(profile: Path) -> list[str]:
    """The engine flags the profile was measured with (its weight format, ...), less the threads and KV budget, which
    `--replicas auto` splits over the maximum itself."""
    given = json.loads((profile / "step_cost.json").read_text())["meta"].get("serve_flags", [])
    out, skip = [], False
    for flag in given:
        if skip:
            skip = False
        elif flag in ("--threads", "--kv-cache-memory-gb"):
            skip = True
        elif not flag.startswith(("--threads=", "--kv-cache-memory-gb=")):
            out.append(flag)
    return out


def load_args(args: argparse.Namespace, trace: Path) -> argparse.Namespace:
    from tokenfab.bench.cli import add_load_args, add_workload_args

    p = argparse.ArgumentParser()
    add_workload_args(p)
    add_load_args(p)
    p.add_argument("--concurrency", type=int, default=None)
    p.add_argument("--rate", type=float, default=None)
    p.add_argument("--model", default=None)
    return p.parse_args(["--workload", "trace", "--trace", str(trace), "--warmup", "0", "--slo-ttft",
                         str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot)])  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--profile", type=Path, required=True, help="a per-replica profile (threads = cores / max)")
    ap.add_argument("--phases", type=phases_arg, default=phases_arg("0.2:60,3:150,0.2:150"))
    ap.add_argument("--isl", type=int, default=128)
    ap.add_argument("--osl", type=int, default=64)
    ap.add_argument("--slo-ttft", type=float, default=2.0)
    ap.add_argument("--slo-tpot", type=float, default=0.1)
    ap.add_argument("--max-replicas", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", type=Path, default=Path(f"benchmarks/reports/autoscale-ramp-{time.strftime('%Y-%m-%d')}"))
    args = ap.parse_args()
    work = args.out.with_suffix("")
    work.mkdir(parents=True, exist_ok=True)
    trace = work / "trace.jsonl"
    counts = write_trace(trace, args.phases, args.isl, args.osl, args.seed)
    flags = ["--replicas", "auto", "--min-replicas", "1", "--max-replicas", str(args.max_replicas),
             "--slo-ttft", str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot),
             "--step-profile", str(args.profile), *profiled_flags(args.profile)]  # fmt: skip
    port = free_port()
    server = launch(ServerSpec("tokenfab", [*TOKENFAB, "serve", "--port", str(port), *flags], dict(os.environ)),
                    port, work)  # fmt: skip
    samples: list[dict] = []
    stop = threading.Event()
    watcher = threading.Thread(target=watch, args=(server.url, samples, stop), daemon=True)
    try:
        time.sleep(12)  # the first replica warms up (the autoscaler trusts its step costs after 10 s)
        watcher.start()
        measured = work / "bench.json"
        subprocess.run([*TOKENFAB, "bench", "serve", "--url", server.url, "--workload", "trace", "--trace",
                        str(trace), "--rate", "1", "--warmup", "0", "--slo-ttft", str(args.slo_ttft), "--slo-tpot",
                        str(args.slo_tpot), "--out", str(measured)], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
        stop.set()
        watcher.join()
        final = httpx.get(f"{server.url}/replicas", timeout=10).json()["autoscaler"]
    finally:
        stop.set()
        server.stop()
    summary = json.loads(measured.read_text())["systems"][0]["points"][0]["summary"]
    optimum = planner_optimum(args, trace, args.phases)
    doc = {
        "machine": {**machine.describe(), **cpu_isa.describe()},
        "command": " ".join(["tokenfab serve", *flags]),
        "phases": [{"rate": r, "seconds": s, "requests": n} for (r, s), n in zip(args.phases, counts)],
        "isl": args.isl, "osl": args.osl, "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot},
        "summary": summary,
        "autoscaler": final,
        "timeline": samples,
        "planner": optimum,
        "profile": str(args.profile),
    }  # fmt: skip
    (work / "ramp.json").write_text(json.dumps(doc, indent=1))
    md = markdown(doc)
    args.out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def markdown(doc: dict) -> str:
    s, a, p = doc["summary"], doc["autoscaler"], doc["planner"]
    span = sum(ph["seconds"] for ph in doc["phases"])
    measured = doc["timeline"][-1]["t"] if doc["timeline"] else span
    tl = doc["timeline"]
    paid = tl[-1]["replica_seconds"] - tl[0]["replica_seconds"] if tl else 0.0  # the server's count over the load
    optimum = sum(ph["seconds"] * (ph["replicas"] or 0) for ph in p["phases"])
    standing = span * (p["whole_trace_replicas"] or 0)
    m = doc["machine"]
    isa = ", ".join(m.get("isa_levels", []))
    lines = [
        "# Autoscaler ramp on real replicas",
        "",
        f"{m['cpu']} ({m['cores']} cores; ISA levels {isa}); Gemma 3 270M (the default model), `{doc['command']}` "
        f"(one thread and half the KV budget per replica). Load: Poisson arrivals, "
        + ", ".join(f"{ph['rate']:g} req/s for {ph['seconds']:g} s ({ph['requests']} requests)" for ph in doc["phases"])
        + f"; prompts of {doc['isl']} tokens, {doc['osl']} out. Measured with `tokenfab bench serve` (trace replay). "
        f"Planner: `tokenfab plan`'s search on the per-replica profile `{doc['profile']}` (simulated).",
        "",
        "| | value |",
        "|---|---|",
        f"| requests within the SLO (TTFT <= {doc['slo']['ttft_s']:g} s, TPOT <= {doc['slo']['tpot_s']:g} s) | "
        f"{s['goodput_fraction']:.1%} of {s['completed']} ({s['sent']} sent) |",
        f"| TTFT p50 / p90 | {s['ttft_s']['p50'] * 1000:.0f} / {s['ttft_s']['p90'] * 1000:.0f} ms |",
        f"| TPOT p50 / p90 | {s['tpot_s']['p50'] * 1000:.0f} / {s['tpot_s']['p90'] * 1000:.0f} ms |",
        f"| replica time the autoscaler paid for while the load ran | {paid:.0f} replica-seconds over {measured:.0f} s"
        f" (from the server's start to the end: {a['replica_seconds']:.0f}) |",
        f"| planner's optimum for the trace (fewest replicas per phase x its length) | {optimum:.0f} replica-seconds "
        f"({', '.join(str(ph['replicas']) for ph in p['phases'])} replicas) |",
        f"| autoscaler / optimum | {paid / optimum:.2f} |" if optimum else "| autoscaler / optimum | - |",
        f"| fewest replicas meeting the SLO standing, for the whole trace | {p['whole_trace_replicas']} "
        f"({standing:.0f} replica-seconds) |",
        "",
        "Decisions: " + "; ".join(f"{d['action']} x{d['count']} ({d['reason']})" for d in a["decisions"]),
        "",
        "Replicas paid for, every 10 s: "
        + " ".join(str(x["paid"]) for x in doc["timeline"][::10]),
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
