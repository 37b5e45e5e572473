"""The ladder: delivered tokens per dollar at a fixed SLO, from a naive baseline through each tokenfab
optimization switched on in turn, with the gain of each step and the compounded gain.

The workload is agentic sessions (each turn re-sends the growing conversation), served by tokenfab on the
embedded model. Each rung starts its own server, sweeps concurrency, and keeps the highest-throughput point
where at least 90 % of requests meet the SLO.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from tokenfab.bench import runner
from tokenfab.bench.launch import free_port, launch, server_spec
from tokenfab.bench.stats import best_within_slo
from tokenfab.bench.sweep import new_document, sweep_system


@dataclass(frozen=True, slots=True)
class Rung:
    name: str
    flags: tuple[str, ...]
    max_seqs: int
    concurrencies: tuple[int, ...] | None = None
    """None: the ladder's concurrency list."""
    model: str | None = None
    """The model this rung serves (None: the ladder's)."""
    baseline: bool = False
    """The rung starts a new comparison (another model): the compounded gain counts from it."""


def rungs(
    concurrencies: tuple[int, ...],
    quantization: str = "none",
    replicas: int = 1,
    kv_pool_gb: float = 0.0,
    moe_model: str | None = None,
) -> list[Rung]:
    """quantization: the weight format of its rung ('none' leaves that rung out); replicas > 1: three more rungs,
    the machine split into that many replicas behind round-robin, then behind the KV-aware router (same cores, same
    KV memory in total, same price), then with prefill/decode roles switched as the load needs (--disaggregation
    auto); kv_pool_gb > 0: two more, on one engine with the rungs above the replicas',
    its KV pool cut to that size (returning sessions find their prefix evicted), then the host-memory KV tier
    added (the same pool); moe_model: two more on that mixture-of-experts model, its experts split over two
    expert-parallel ranks (same cores), then rebalanced from the measured load (EPLB, two redundant copies)."""
    top = max(concurrencies)
    out = [
        Rung("naive: one request at a time, no prefix cache", ("--no-enable-prefix-caching",), 1, (1,)),
        Rung("+ continuous batching", ("--no-enable-prefix-caching",), top),
        Rung("+ prefix caching", ("--enable-prefix-caching",), top),
        Rung("+ speculative decoding (n-gram, adaptive)", ("--enable-prefix-caching", "--speculative", "ngram"), top),
    ]
    if quantization != "none":
        # The rungs compound: the last keeps everything above it.
        out.append(Rung(f"+ {quantization} weights", (*out[-1].flags, "--quantization", quantization), top))
    single = out[-1].flags
    if replicas > 1:
        split = (*single, "--replicas", str(replicas))
        out.append(Rung(f"{replicas} replicas, round-robin", (*split, "--router", "round-robin"), top))
        out.append(Rung("+ KV-aware routing", (*split, "--router", "kv"), top))
        out.append(Rung("+ disaggregation (auto)", (*split, "--router", "kv", "--disaggregation", "auto"), top))
    if kv_pool_gb > 0:
        small = (*single, "--kv-cache-memory-gb", f"{kv_pool_gb:g}")
        out.append(Rung(f"one engine, KV pool cut to {kv_pool_gb:g} GB", small, top))
        out.append(Rung("+ host-memory KV tier (2 GB)", (*small, "--kv-host-gb", "2"), top))
    if moe_model is not None:
        ep = ("--enable-prefix-caching", "--data-parallel-size", "2", "--expert-parallel")
        out.append(Rung("MoE model: 2 expert-parallel ranks", ep, top, model=moe_model, baseline=True))
        eplb = (*ep, "--eplb", "--num-redundant-experts", "2", "--eplb-interval-steps", "32")
        out.append(Rung("+ EPLB (2 redundant experts)", eplb, top, model=moe_model))
    return out


def ladder_rows(entries: list[tuple[Rung, dict]], price_per_hour: float) -> list[dict]:
    rows, base, previous = [], None, None
    for rung, entry in entries:
        point = best_within_slo(entry["points"], "output_tok_s")
        tok_s = point["summary"]["output_tok_s"] if point else 0.0
        per_usd = tok_s * 3600 / price_per_hour if price_per_hour else None
        base = per_usd if base is None or rung.baseline else base
        rows.append(
            {
                "rung": rung.name,
                "concurrency": point["concurrency"] if point else None,
                "output_tok_s": tok_s,
                "tokens_per_usd": per_usd,
                "step_gain": per_usd / previous if previous and per_usd and not rung.baseline else None,
                "compounded_gain": per_usd / base if base and per_usd else None,
                "ttft_p50_s": point["summary"]["ttft_s"]["p50"] if point else None,
                "tpot_p50_s": point["summary"]["tpot_s"]["p50"] if point else None,
            }
        )
        previous = per_usd or previous
    return rows


def main(args: argparse.Namespace) -> int:
    args.workload, args.prefix_len, args.think_time, args.seed, args.url = "agentic", 512, 0.0, 0, None
    concurrencies = tuple(int(x) for x in args.concurrency.split(","))
    config = runner.build_config(args, concurrencies, False)
    workload = runner.build_workload(args, runner.items_needed(config, True))
    doc = new_document(workload, config, None)
    doc["kind"] = "tokenfab-bench-ladder"
    out = args.out / "ladder.json"
    entries: list[tuple[Rung, dict]] = []
    chosen = rungs(concurrencies, args.quantization, args.replicas, args.kv_pool_gb, args.moe_model)
    if args.rungs:
        chosen = [chosen[int(i) - 1] for i in args.rungs.split(",")]
    for rung in chosen:
        rung_config = config if rung.concurrencies is None else replace(config, points=list(rung.concurrencies))
        port = free_port()
        model = rung.model or args.model
        extra = list(rung.flags) + (["--model", model] if model else [])
        spec = server_spec("tokenfab", port, Path(".peers"), 2, rung.max_seqs, 4096, extra)
        server = launch(spec, port, args.out / "logs")
        try:
            runner.run_with_progress(
                # called before the loop moves on, so binding the loop variables late is what is meant
                lambda progress: sweep_system(server.url, rung.name, workload, rung_config, doc, out, progress),  # noqa: B023
                len(rung_config.points),
            )
        finally:
            server.stop()
        entries.append((rung, doc["systems"][-1]))
    rows = ladder_rows(entries, config.price_per_hour)
    doc["ladder"] = rows
    out.write_text(json.dumps(doc, indent=1))
    (args.out / "ladder.md").write_text(markdown(doc, rows))
    _print(rows, doc)
    return 0


def markdown(doc: dict, rows: list[dict]) -> str:
    w, slo = doc["workload"], doc["slo"]
    lines = [
        f"# Ladder: tokens per dollar at an SLO ({time.strftime('%Y-%m-%d')})",
        "",
        "Workload: agentic sessions (max(4, 2 x concurrency) fresh sessions per point, "
        f"{w['turns']} turns each; system prompt "
        f"{w['system_len']} tokens, tool outputs ~{w['tool_len']}, replies ~{w['reply_len']} tokens). "
        f"SLO: TTFT <= {slo['ttft_s']} s and TPOT <= {slo['tpot_s']} s for >= 90 % of requests. "
        f"Price: ${doc['price_per_hour']}/device-hour. Machine: {doc['machine']['cpu']}, "
        f"{doc['machine']['cores']} cores.",
        "",
        "| rung | best concurrency | output tok/s | tokens per $ | step gain | compounded |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['rung']} | {r['concurrency'] or '-'} | {r['output_tok_s']:.2f} | "
            f"{_num(r['tokens_per_usd'])} | {_x(r['step_gain'])} | {_x(r['compounded_gain'])} |"
        )
    return "\n".join(lines) + "\n"


def _num(v) -> str:
    return "-" if v is None else f"{v:,.0f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def _print(rows: list[dict], doc: dict) -> None:
    table = Table(title=f"tokens per $ at SLO TTFT<={doc['slo']['ttft_s']}s TPOT<={doc['slo']['tpot_s']}s")
    for col in ("rung", "concurrency", "out tok/s", "tokens/$", "step", "compounded"):
        table.add_column(col)
    for r in rows:
        table.add_row(
            r["rung"],
            str(r["concurrency"] or "-"),
            f"{r['output_tok_s']:.2f}",
            _num(r["tokens_per_usd"]),
            _x(r["step_gain"]),
            _x(r["compounded_gain"]),
        )
    Console().print(table)
