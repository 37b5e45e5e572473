"""Validation: the simulator against measured runs. For held-out configurations, `tokenfab bench serve` against a
live `tokenfab serve` (with the profile's engine flags) and `tokenfab simulate` with the profile, the same workload
flags; the error of output throughput, TTFT p50/p90 and TPOT p50 (`tokenfab simulate --validate`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from tokenfab.bench.launch import ServerSpec, free_port, launch
from tokenfab.bench.report import fixed
from tokenfab.platform import cpu_isa, machine

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


def validate(profile: Path, out: Path, configs: dict[str, list[str]] | None = None, model: str | None = None) -> dict:
    """Measure each configuration against `tokenfab serve` (run with the profile's engine flags) and simulate it
    with the profile; writes out.json and out.md and returns the document."""
    from tokenfab.sim.plan_report import profile_flags
    from tokenfab.sim.step_cost import StepCostModel

    serve_flags = list(profile_flags(StepCostModel.load(profile).meta))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        model_flags = ["--model", model] if model else []
        command = [*TOKENFAB, "serve", "--port", str(port), *serve_flags, *model_flags]
        server = launch(ServerSpec("tokenfab", command, dict(os.environ)), port, Path(tmp))
        try:
            for seed, (name, config_flags) in enumerate((configs or CONFIGS).items(), 1):
                # A seed of its own per configuration: the live server keeps its prefix cache between them.
                flags = [*config_flags, "--seed", str(seed), *model_flags]
                measured, simulated = Path(tmp) / "m.json", Path(tmp) / "s.json"
                subprocess.run([*TOKENFAB, "bench", "serve", "--url", server.url, *flags, "--out", str(measured)],
                               check=True, stdout=subprocess.DEVNULL)  # fmt: skip
                subprocess.run([*TOKENFAB, "simulate", "--profile", str(profile), *flags, "--out",
                                str(simulated)], check=True, stdout=subprocess.DEVNULL)  # fmt: skip
                m, s = summary(measured), summary(simulated)
                row: dict = {"config": name}
                for metric, get in METRICS.items():
                    row[metric] = {"measured": get(m), "simulated": get(s)}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        finally:
            server.stop()
    doc = {
        "machine": machine.describe(),
        "isa_levels": cpu_isa.describe()["isa_levels"],
        "profile": json.loads((profile / "step_cost.json").read_text()),
        "serve_flags": serve_flags,
        "rows": rows,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    out.with_suffix(".md").write_text(markdown(doc, profile))
    return doc


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
        "measured with `tokenfab bench serve` against one `tokenfab serve` (the profile's engine flags) and simulated "
        "with `tokenfab simulate` on the same flags. Command: `tokenfab simulate --validate --profile ...`.",
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
