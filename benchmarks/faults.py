"""What a replica's death, hang or drain costs the requests in flight: `tokenfab serve --replicas 3` on the default
model under closed-loop load, with request migration on (the default) and off (what users of servers that do not
migrate get).

    .venv/bin/python benchmarks/faults.py          # from the repository root, on a quiet machine (~6 minutes)

Each run: a fault-free phase gives every request kind's latency and text; then, under the same load, the busiest
replica is killed (SIGKILL) and restarts, the busiest other one is stopped (SIGSTOP) until the router counts it hung
(--replica-hang-timeout) and restarts it, and the third is drained. Requests in flight at a fault are "hit". Writes
faults-<date>.json and .md under benchmarks/reports: requests completed / lost, texts equal to the fault-free ones,
the added latency of hit requests (p50 / p99 over their kind's fault-free median), time to notice the hang, time to
restart, time to drain.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tokenfab.bench.faults import ClosedLoop, Outcome, kill_hang_drain  # noqa: E402
from tokenfab.bench.launch import ServerSpec, free_port, launch  # noqa: E402
from tokenfab.platform import cpu_isa, machine  # noqa: E402

TOPICS = ["the tides", "a lighthouse", "bread", "glaciers", "chess openings", "volcanoes"]
MAX_TOKENS = 64


def request(n: int) -> tuple[str, dict]:
    i, seeded = n % len(TOPICS), bool(n // len(TOPICS) % 2)
    sampling = {"temperature": 0.8, "seed": 40 + i} if seeded else {"temperature": 0}
    prompt = f"Write a long, detailed essay about {TOPICS[i]}, with an introduction and five sections."
    return f"{i}{'s' if seeded else 'g'}", {"prompt": prompt, "max_tokens": MAX_TOKENS, "ignore_eos": True, **sampling}


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def run(migration: bool, hang_timeout: float, baseline_s: float, workers: int, log_dir: Path) -> dict:
    port = free_port()
    flags = ["--replicas", "3", "--replica-hang-timeout", str(hang_timeout), "--kv-cache-memory-gb", "0.75"]
    flags += [] if migration else ["--no-migration"]
    cmd = [sys.executable, "-m", "tokenfab.cli", "serve", "--port", str(port), *flags]
    server = launch(ServerSpec("tokenfab", cmd, dict(os.environ)), port, log_dir)
    try:
        with ClosedLoop(server.url, request, workers) as calm:
            time.sleep(baseline_s)
        with ClosedLoop(server.url, request, workers) as load:
            faults = kill_hang_drain(server.url, settle=3.0, before=3.0)
    finally:
        server.stop()
    ok = [o for o in calm.outcomes if o.status == 200]
    reference = {o.key: o.text for o in ok}
    typical = {k: statistics.median(o.end - o.start for o in ok if o.key == k) for k in reference}

    def hit(o: Outcome) -> bool:
        return any(o.start < t < o.end for t in faults.times)

    done = [o for o in load.outcomes if o.status == 200]
    hits = [o for o in done if hit(o) and o.key in typical]
    added = [(o.end - o.start) - typical[o.key] for o in hits]
    calm_latency = [o.end - o.start for o in ok]
    return {
        "migration": migration,
        "hang_timeout_s": hang_timeout,
        "workers": workers,
        "baseline_requests": len(calm.outcomes),
        "baseline_latency_p50_s": percentile(calm_latency, 0.5),
        "requests": len(load.outcomes),
        "completed": len(done),
        "lost": len(load.outcomes) - len(done),
        "lost_statuses": sorted({str(o.status) for o in load.outcomes if o.status != 200}),
        "texts_checked": sum(o.key in reference for o in done),
        "texts_equal": sum(reference.get(o.key) == o.text for o in done),
        "hit_completed": len(hits),
        "hit_lost": sum(hit(o) for o in load.outcomes if o.status != 200),
        "added_latency_p50_s": percentile(added, 0.5),
        "added_latency_p99_s": percentile(added, 0.99),
        "seconds": faults.seconds(),
        "replicas": {"killed": faults.killed, "hung": faults.hung, "drained": faults.drained},
        "drain_reply": faults.drain_reply,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hang-timeout", type=float, default=5.0, help="--replica-hang-timeout of the server")
    ap.add_argument("--baseline-s", type=float, default=30.0, help="seconds of fault-free load first")
    ap.add_argument("--workers", type=int, default=6, help="closed-loop clients")
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "reports" / f"faults-{date.today()}",
        help="path of the report, without suffix (.json and .md are written)",
    )
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        runs = [run(m, args.hang_timeout, args.baseline_s, args.workers, Path(tmp)) for m in (True, False)]
    for r in runs:
        print(json.dumps(r), flush=True)
    doc = {
        "machine": machine.describe(),
        "isa_levels": cpu_isa.describe()["isa_levels"],
        "max_tokens": MAX_TOKENS,
        "runs": runs,
    }
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    args.out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


def markdown(doc: dict) -> str:
    lines = [
        "# Faults under load: a replica killed, one hung, one drained",
        "",
        f"{doc['machine']['cpu']} ({doc['machine']['cores']} cores; ISA levels {', '.join(doc['isa_levels'])}), "
        f"Gemma 3 270M, `tokenfab serve --replicas 3` (one thread each), {doc['runs'][0]['workers']} closed-loop "
        f"clients (greedy and seeded requests of {doc['max_tokens']} tokens, half streamed). "
        "Command: `.venv/bin/python benchmarks/faults.py`.",
        "",
        "| migration | requests | completed | lost | texts equal to fault-free | hit by a fault: completed / lost | "
        "added latency of hit requests p50 / p99 | hang noticed after | kill → restarted | drain |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["runs"]:
        s = r["seconds"]
        lines.append(
            f"| {'on' if r['migration'] else 'off'} | {r['requests']} | {r['completed']} | {r['lost']} | "
            f"{r['texts_equal']} / {r['texts_checked']} | {r['hit_completed']} / {r['hit_lost']} | "
            f"{_s(r['added_latency_p50_s'])} / {_s(r['added_latency_p99_s'])} | "
            f"{_s(s['stop_to_hang_noticed'])} (timeout {r['hang_timeout_s']:g} s) | {_s(s['kill_to_restarted'])} | "
            f"{_s(s['drain'])} ({_drained(r['drain_reply'])}) |"
        )
    base = doc["runs"][0]
    lines += [
        "",
        f"Fault-free latency p50: {_s(base['baseline_latency_p50_s'])} per request. A hit request's added latency is "
        "its end-to-end time minus its kind's fault-free median; that median was measured with three one-thread "
        "replicas sharing 2 cores, so requests that ran while a replica was down (fewer sharing the cores) can come "
        "out faster than it (negative). Drained with migration off, a replica's requests finish where they are.",
    ]
    return "\n".join(lines) + "\n"


def _drained(reply: dict) -> str:
    return f"{reply['moved']} moved" if "moved" in reply else f"{reply.get('finished', 0)} finished there"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} s"


if __name__ == "__main__":
    main()
