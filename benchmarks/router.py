"""Replicas and routing policies side by side: `tokenfab serve --replicas 2 --router P` for each policy, and one
replica holding the whole KV cache, and SGLang's router (cache-aware) in front of two separate tokenfab servers as the
outside baseline, on the agentic workload (multi-turn sessions with think time: prefix reuse) and on random
1024/128 (no reuse).

    .venv/bin/python benchmarks/router.py          # from the repository root, on a quiet machine (~20 minutes)

Every configuration has this machine's cores and KV budget in total (2 replicas: 1 thread and half the KV memory
each). The load is `tokenfab bench serve` (closed loop). Writes router-<date>.json and .md under
benchmarks/reports: prefix-cache hit rate, TTFT p50/p99, TPOT p50, output tok/s, $/Mtok, and the targets' ratios;
and router-<date>.png (`--replot JSON` redraws it from a report).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tokenfab.bench.launch import Launched, ServerSpec, free_port, launch  # noqa: E402
from tokenfab.bench.report import fixed, millis  # noqa: E402
from tokenfab.platform import cpu_isa, machine  # noqa: E402

SGLANG = "2 servers: sglang-router cache_aware"
"""The outside baseline: SGLang's router (benchmarks/peers/setup_peers.sh sglang-router) in front of two separate
one-thread tokenfab servers. It lists its model as "unknown", so the servers serve under that name."""
SGLANG_ROUTER = REPO / ".peers" / "sglang-router" / "bin" / "python"
CONFIGS = {
    "1 replica (whole cache)": ["--replicas", "1"],
    "2 replicas: round-robin": ["--replicas", "2", "--router", "round-robin"],
    "2 replicas: least-load": ["--replicas", "2", "--router", "least-load"],
    "2 replicas: prefix": ["--replicas", "2", "--router", "prefix"],
    "2 replicas: kv": ["--replicas", "2", "--router", "kv"],
    SGLANG: [],
}


def agentic(turns: int) -> list[str]:
    """16 sessions, 8 at a time: a 512-token system prompt each, ~128-token tool outputs, ~32-token replies."""
    return [
        *("--workload", "agentic", "--sessions", "16", "--turns", str(turns), "--prefix-len", "512"),
        *("--isl", "128", "--osl", "32", "--think-time", "0.5", "--concurrency", "8"),
    ]


WORKLOADS = {
    "agentic": agentic(4),
    "agentic 8 turns": agentic(8),
    "random 1024/128": [
        *("--workload", "random", "--isl", "1024", "--osl", "128", "--concurrency", "4", "--num-requests", "16")
    ],
}
TOKENFAB = [sys.executable, "-m", "tokenfab.cli"]


def start(flags: list[str], kv_gb: float, log_dir: Path) -> Launched:
    port = free_port()
    cmd = [*TOKENFAB, "serve", "--port", str(port), "--kv-cache-memory-gb", str(kv_gb), *flags]
    return launch(ServerSpec("tokenfab", cmd, dict(os.environ)), port, log_dir)


class SglangPair:
    """Two tokenfab servers (one thread and half the KV budget each) behind sglang-router's cache-aware policy."""

    def __init__(self, kv_gb: float, log_dir: Path) -> None:
        self.workers: list[Launched] = []
        self.router: Launched | None = None
        try:
            for _ in range(2):
                self.workers.append(start(["--threads", "1", "--served-model-name", "unknown"], kv_gb / 2, log_dir))
            port, metrics_port = free_port(), free_port()
            cmd = [
                str(SGLANG_ROUTER),
                "-m",
                "sglang_router.launch_router",
                "--port",
                str(port),
                "--policy",
                "cache_aware",
                "--prometheus-port",
                str(metrics_port),
                "--worker-urls",
                *[w.url for w in self.workers],
            ]
            self.router = launch(ServerSpec("sglang-router", cmd, dict(os.environ)), port, log_dir)
        except BaseException:
            self.stop()
            raise
        self.url = self.router.url

    def stop(self) -> None:
        for p in ([self.router] if self.router else []) + self.workers:
            p.stop()


def run(url: str, workload: list[str], out: Path) -> dict:
    subprocess.run(
        [*TOKENFAB, "bench", "serve", "--url", url, *workload, "--out", str(out)], check=True, stdout=subprocess.DEVNULL
    )
    point = json.loads(out.read_text())["systems"][0]["points"][0]
    return point["summary"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="in total, split between the replicas")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--workloads", default="agentic,random 1024/128", help=f"of: {', '.join(WORKLOADS)}")
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every configuration this many times, alternating (the targets' ratios: median over rounds)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=REPO / "benchmarks" / "reports" / f"router-{date.today()}",
        help="path of the report, without suffix (.json and .md are written)",
    )
    ap.add_argument("--replot", type=Path, help="only redraw the plot of this report's JSON")
    args = ap.parse_args()
    if args.replot is not None:
        plot(json.loads(args.replot.read_text()), args.replot.with_suffix(".png"))
        return
    rows = []
    workloads = {name: WORKLOADS[name] for name in args.workloads.split(",")}
    rounds = [(r, config) for r in range(args.rounds) for config in args.configs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        for round_, config in rounds:
            if config == SGLANG and not SGLANG_ROUTER.exists():
                print(f"skipping {config}: run benchmarks/peers/setup_peers.sh sglang-router", flush=True)
                continue
            server: Launched | SglangPair = (
                SglangPair(args.kv_cache_memory_gb, Path(tmp))
                if config == SGLANG
                else start(CONFIGS[config], args.kv_cache_memory_gb, Path(tmp))
            )
            url = server.url
            try:
                for name, workload in workloads.items():
                    s = run(url, workload, Path(tmp) / "point.json")
                    rows.append(
                        {
                            "config": config,
                            "workload": name,
                            "round": round_,
                            **{
                                k: s[k]
                                for k in (
                                    "prefix_cache_hit_rate",
                                    "output_tok_s",
                                    "usd_per_mtok_output",
                                    "completed",
                                    "sent",
                                )
                            },
                            "ttft_p50": s["ttft_s"]["p50"],
                            "ttft_p99": s["ttft_s"]["p99"],
                            "tpot_p50": s["tpot_s"]["p50"],
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
                if config != SGLANG:
                    rows[-1]["replicas"] = httpx.get(f"{url}/replicas").json()
            finally:
                server.stop()
    isa = cpu_isa.describe()["isa_levels"]
    given = " ".join(a for a in sys.argv[1:])
    doc = {
        "command": f" {given}" if given else "",
        "machine": machine.describe(),
        "isa_levels": isa,
        "threads": os.cpu_count(),
        "workloads": workloads,
        "rounds": args.rounds,
        "kv_cache_memory_gb_total": args.kv_cache_memory_gb,
        "rows": rows,
    }
    out = args.out
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(markdown(doc))
    plot(doc, out.with_suffix(".png"))
    print(markdown(doc))


def plot(doc: dict, path: Path) -> None:
    """Per workload (rows): prefix hit rate, TTFT p50 / p99 and output tok/s of each configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    medians = median_rows(doc["rows"])
    workloads = list(dict.fromkeys(r["workload"] for r in medians))
    fig, axes = plt.subplots(len(workloads), 3, figsize=(15, 3.6 * len(workloads)), squeeze=False)
    for row_axes, workload in zip(axes, workloads):
        rows = [r for r in medians if r["workload"] == workload]
        names = [r["config"].replace("2 replicas: ", "2x ").replace("2 servers: ", "") for r in rows]
        colors = [
            "#d62728"
            if n.endswith(" kv")
            else "#ff7f0e"
            if "sglang" in n
            else "#7f7f7f"
            if "1 replica" in n
            else "#1f77b4"
            for n in names
        ]
        panels = [
            ("prefix hit rate", [r["prefix_cache_hit_rate"] or 0 for r in rows], None),
            (
                "TTFT p50 (bar) / p99 (tick), ms",
                [r["ttft_p50"] * 1e3 for r in rows],
                [r["ttft_p99"] * 1e3 for r in rows],
            ),
            ("output tok/s", [r["output_tok_s"] for r in rows], None),
        ]
        for ax, (title, values, ticks) in zip(row_axes, panels):
            ax.bar(names, values, color=colors)
            if ticks is not None:
                ax.scatter(names, ticks, marker="_", s=400, color="black")
            if title == "prefix hit rate":
                ax.set_ylim(0, 1)
            ax.set_title(f"{workload}: {title}", fontsize=10)
            ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    rounds = f", median of {doc['rounds']} rounds" if doc.get("rounds", 1) > 1 else ""
    fig.suptitle(f"Replicas behind the router ({doc['machine']['cpu']}, Gemma 3 270M, 2 threads in total{rounds})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


METRICS = ("prefix_cache_hit_rate", "ttft_p50", "ttft_p99", "tpot_p50", "output_tok_s", "usd_per_mtok_output")


def median_rows(rows: list[dict]) -> list[dict]:
    """One row per (workload, configuration): each metric's median over the rounds."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r["workload"], r["config"]), []).append(r)
    out = []
    for (workload, config), group in groups.items():
        row = {"workload": workload, "config": config}
        for key in METRICS:
            values = [r[key] for r in group if r[key] is not None]
            row[key] = statistics.median(values) if values else None
        out.append(row)
    return out


def markdown(doc: dict) -> str:
    rows = doc["rows"]
    rounds = doc.get("rounds", 1)
    lines = [
        "# Replicas behind the router: policies side by side",
        "",
        f"{doc['machine']['cpu']} ({doc['machine']['cores']} cores; ISA levels "
        f"{', '.join(doc['isa_levels'])}), Gemma 3 270M, "
        f"{doc['kv_cache_memory_gb_total']} GB of KV cache and 2 threads in total per configuration. "
        f"Command: `.venv/bin/python benchmarks/router.py{doc.get('command', '')}`"
        + (f"; {rounds} rounds, configurations alternating." if rounds > 1 else "."),
        "",
        "| workload | configuration | round | prefix hit rate | TTFT p50 | TTFT p99 | TPOT p50 | output tok/s | "
        "$/Mtok out |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["workload"], r.get("round", 0))):
        lines.append(
            f"| {r['workload']} | {r['config']} | {r.get('round', 0) + 1} | {fixed(r['prefix_cache_hit_rate'], 3)} | "
            f"{millis(r['ttft_p50'])} | "
            f"{millis(r['ttft_p99'])} | {millis(r['tpot_p50'])} | {fixed(r['output_tok_s'])} | "
            f"{fixed(r['usd_per_mtok_output'], 2)} |"
        )
    by = {(r["workload"], r["config"], r.get("round", 0)): r for r in rows}

    def ratio(workload: str, a: str, b: str, key: str) -> str:
        """a / b within each round; with several rounds, their median and each round's."""
        each = []
        for n in range(rounds):
            x, y = by.get((workload, a, n)), by.get((workload, b, n))
            if x and y and x[key] and y[key]:
                each.append(x[key] / y[key])
        if not each:
            return "-"
        if len(each) == 1:
            return f"{each[0]:.2f}"
        return f"{statistics.median(each):.2f} (median; rounds: {', '.join(f'{e:.2f}' for e in each)})"

    kv, one, rr, ll = "2 replicas: kv", "1 replica (whole cache)", "2 replicas: round-robin", "2 replicas: least-load"
    lines += [
        "",
        "Targets:",
        f"- agentic, kv hit rate / one replica's: {ratio('agentic', kv, one, 'prefix_cache_hit_rate')} (>= 0.9)",
        f"- agentic, kv TTFT p50 / round-robin's: {ratio('agentic', kv, rr, 'ttft_p50')} (<= 0.5)",
        f"- agentic 8 turns, kv TTFT p50 / round-robin's: {ratio('agentic 8 turns', kv, rr, 'ttft_p50')} (<= 0.5)",
        f"- agentic 8 turns, kv hit rate / one replica's: "
        f"{ratio('agentic 8 turns', kv, one, 'prefix_cache_hit_rate')} (>= 0.9)",
        f"- random, kv throughput / least-load's: {ratio('random 1024/128', kv, ll, 'output_tok_s')} (>= 0.95)",
        "",
        "Against the outside baseline (sglang-router's cache-aware policy over two separate servers):",
        f"- agentic, kv TTFT p50 / sglang-router's: {ratio('agentic', kv, SGLANG, 'ttft_p50')}; hit rate: "
        f"{ratio('agentic', kv, SGLANG, 'prefix_cache_hit_rate')}; throughput: "
        f"{ratio('agentic', kv, SGLANG, 'output_tok_s')}",
        f"- random, kv throughput / sglang-router's: {ratio('random 1024/128', kv, SGLANG, 'output_tok_s')}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
