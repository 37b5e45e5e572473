"""The simulator against measured runs: for held-out configurations, `tokenfab bench serve` against a live
`tokenfab serve` and `tokenfab simulate` with this machine's profile, the same workload flags; the error of output
throughput, TTFT p50/p90 and TPOT p50.

    .venv/bin/python -m tokenfab.cli profile --out benchmarks/profiles/<name>    # ~1 minute
    .venv/bin/python benchmarks/sim_validation.py --profile benchmarks/profiles/<name>   # quiet machine, ~10 min

Writes sim-validation-<date>.json and .md under benchmarks/reports.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tokenfab.bench.launch import ServerSpec, free_port, launch  # noqa: E402
from tokenfab.bench.report import fixed  # noqa: E402
from tokenfab.platform import cpu_isa, machine  # noqa: E402

TOKENFAB = [sys.executable, "-m", "tokenfab.cli"]
CONFIGS = {
    "random 1024/128, c=1": ["--workload", "random", "--isl", "1024", "--osl", "128", "--concurrency", "1",
                             "--num-requests", "6"],
    "random 1024/128, c=4": ["--workload", "random", "--isl", "1024", "--osl", "128", "--concurrency", "4"],
    "random 1024/128, c=16": ["--workload", "random", "--isl", "1024", "--osl", "128", "--concurrency", "16"],
    "random 256/64, c=8": ["--workload", "random", "--isl", "256", "--osl", "64", "--concurrency", "8",
                           "--num-requests", "32"],
    "prefix 512+128/64, c=8": ["--workload", "prefix", "--prefix-len", "512", "--isl", "128", "--osl", "64",
                               "--concurrency", "8", "--num-requests", "32"],
    "agentic 8 sessions x 4, c=4": ["--workload", "agentic", "--sessions", "8", "--turns", "4", "--prefix-len",
                                    "512", "--isl", "128", "--osl", "32", "--think-time", "0.5", "--concurrency", "4"],
    "random 512/128, rate 1/s": ["--workload", "random", "--isl", "512", "--osl", "128", "--rate", "1",
                                 "--num-requests", "24"],
}  # fmt: skip
METRICS = {
    "output tok/s": lambda s: s["output_tok_s"],
    "TTFT p50": lambda s: s["ttft_s"]["p50"],
    "TTFT p90": lambda s: s["ttft_s"]["p90"],
    "TPOT p50": lambda s: s["tpot_s"]["p50"],
}
TARGETS = {"output tok/s": 0.10, "TTFT p50": 0.15, "TTFT p90": None, "TPOT p50": 0.10}


def summary(path: Path) -> dict:
    return json.loads(path.read_text())["systems"][0]["points"][0]["summary"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--profile", type=Path, required=True)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "reports" / f"sim-validation-{date.today()}")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        server = launch(ServerSpec("tokenfab", [*TOKENFAB, "serve", "--port", str(port)], dict(os.environ)), port,
                        Path(tmp))  # fmt: skip
        try:
            for seed, (name, config_flags) in enumerate(CONFIGS.items(), 1):
                # A seed of its own per configuration: the live server keeps its prefix cache between them.
                flags = [*config_flags, "--seed", str(seed)]
                measured, simulated = Path(tmp) / "m.json", Path(tmp) / "s.json"
                subprocess.run([*TOKENFAB, "bench", "serve", "--url", server.url, *flags, "--out", str(measured)],
                               check=True, stdout=subprocess.DEVNULL)  # fmt: skip
                subprocess.run([*TOKENFAB, "simulate", "--profile", str(args.profile), *flags, "--out",
                                str(simulated)], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
                m, s = summary(measured), summary(simulated)
                row = {"config": name}
                for metric, get in METRICS.items():
                    row[metric] = {"measured": get(m), "simulated": get(s)}
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            server.stop()
    doc = {
        "machine": machine.describe(),
        "isa_levels": cpu_isa.describe()["isa_levels"],
        "profile": json.loads((args.profile / "step_cost.json").read_text()),
        "rows": rows,
    }
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    args.out.with_suffix(".md").write_text(markdown(doc, args.profile))
    print(markdown(doc, args.profile))


def error(cell: dict) -> float | None:
    m, s = cell["measured"], cell["simulated"]
    return (s - m) / m if m and s is not None else None


def markdown(doc: dict, profile: Path) -> str:
    meta = doc["profile"]["meta"]
    lines = [
        "# The simulator against measured runs",
        "",
        f"{doc['machine']['cpu']} ({doc['machine']['cores']} cores; ISA levels {', '.join(doc['isa_levels'])}), "
        f"{meta['model']} ({meta['weights']}, {meta['dtype']}, {meta['threads']} threads). Profile `{profile}` "
        f"({meta['steps']} measured steps, fit error median {meta['median_rel_error']:.1%}); each configuration "
        "measured with `tokenfab bench serve` against one `tokenfab serve` and simulated with `tokenfab simulate` on "
        "the same flags. Command: `.venv/bin/python benchmarks/sim_validation.py --profile ...`.",
        "",
        "| configuration | " + " | ".join(f"{k} measured / simulated (error)" for k in METRICS) + " |",
        "|---|" + "---|" * len(METRICS),
    ]
    for r in doc["rows"]:
        cells = []
        for metric in METRICS:
            c = r[metric]
            e = error(c)
            scale = 1 if metric == "output tok/s" else 1e3
            unit = "" if metric == "output tok/s" else " ms"
            m, s = (None if v is None else v * scale for v in (c["measured"], c["simulated"]))
            cells.append(f"{fixed(m)} / {fixed(s)}{unit} ({'-' if e is None else f'{e:+.0%}'})")
        lines.append(f"| {r['config']} | " + " | ".join(cells) + " |")
    lines += ["", "Targets (every configuration):"]
    for metric, bound in TARGETS.items():
        errs = [e for r in doc["rows"] if (e := error(r[metric])) is not None]
        if not errs:
            continue
        worst = max(abs(e) for e in errs)
        within = sum(abs(e) <= bound for e in errs) if bound else None
        target = f"within ±{bound:.0%}: {within} of {len(errs)}" if bound else "no target"
        lines.append(f"- {metric}: worst error {worst:.0%}; {target}")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
