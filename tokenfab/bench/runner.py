"""Glue between the bench command line and the sweep: build the workload, the config, run, print."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn
from rich.table import Table

from tokenfab.bench import workloads as wl
from tokenfab.bench.client import Unreachable
from tokenfab.bench.launch import free_port, launch, server_spec
from tokenfab.bench.records import SLO
from tokenfab.bench.sweep import SweepConfig, Workload, items_needed, new_document, sweep_system
from tokenfab.platform.prices import PROFILES
from tokenfab.tokenizer import Tokenizer


def build_workload(args: argparse.Namespace, n: int, tok: Tokenizer | None = None) -> Workload:
    """The workload with n distinct requests (sessions for agentic), written with `tok` (default: the model's)."""
    from tokenfab.models.loading import load_tokenizer, resolve_model

    tok = tok or load_tokenizer(resolve_model(args.model))
    name = args.workload
    if name == "random":
        return Workload(
            name, {"isl": args.isl, "osl": args.osl}, wl.random_workload(tok, args.isl, args.osl, n, args.seed)
        )
    if name == "prefix":
        params = {
            "num_prefixes": args.num_prefixes,
            "prefix_len": args.prefix_len,
            "suffix_len": args.isl,
            "osl": args.osl,
        }
        return Workload(
            name, params, wl.prefix_workload(tok, args.num_prefixes, args.prefix_len, args.isl, args.osl, n, args.seed)
        )
    if name == "chat":
        params = {"distribution": "log-normal, mean in 256 / out 192"}
        return Workload(name, params, wl.chat_workload(tok, n, args.seed))
    if name == "trace":
        if args.trace is None:
            raise ValueError("--workload trace needs --trace FILE")
        return Workload(name, {"trace": str(args.trace)}, wl.trace_workload(args.trace, tok, args.seed))
    params = {
        "sessions": max(n, args.sessions),
        "turns": args.turns,
        "system_len": args.prefix_len,
        "tool_len": args.isl,
        "reply_len": args.osl,
        "think_time_s": args.think_time,
    }
    sessions = wl.agentic_sessions(
        tok, max(n, args.sessions), args.turns, args.prefix_len, args.isl, args.osl, args.think_time, args.seed
    )
    return Workload(name, params, sessions=sessions, count_tokens=lambda t: len(tok.encode(t)))


def build_config(args: argparse.Namespace, points, open_loop: bool) -> SweepConfig:
    cores = len(os.sched_getaffinity(0))
    cpu = PROFILES["cpu"]
    price = args.price_per_hour if args.price_per_hour is not None else cpu.usd_per_hour * cores
    watts = args.power_watts if args.power_watts is not None else cpu.peak_watts * cores
    return SweepConfig(
        list(points),
        open_loop,
        args.num_requests,
        args.warmup,
        args.max_duration,
        price,
        SLO(args.slo_ttft, args.slo_tpot),
        watts,
        args.request_timeout,
        args.burstiness,
    )


def _ceilings() -> dict:
    from tokenfab.platform.machine import measure_ceilings

    return measure_ceilings()


def sweep_urls(args: argparse.Namespace, points, open_loop: bool, out: Path) -> dict:
    config = build_config(args, points, open_loop)
    workload = build_workload(args, items_needed(config, args.workload == "agentic"))
    doc = new_document(workload, config, None)
    system = args.system or "server"
    if not run_with_progress(
        lambda progress: sweep_system(args.url, system, workload, config, doc, out, progress), len(points)
    ):
        doc["interrupted"] = True
    return doc


def sweep_launched(args: argparse.Namespace, points, open_loop: bool, out: Path) -> dict:
    config = build_config(args, points, open_loop)
    workload = build_workload(args, items_needed(config, args.workload == "agentic"))
    doc = new_document(workload, config, _ceilings())
    max_seqs = max(int(p) for p in points) if not open_loop else 64
    for system in [s.strip() for s in args.launch.split(",") if s.strip()]:
        port = free_port()
        spec = server_spec(system, port, args.peers_dir, args.server_threads, max_seqs, args.max_model_len)
        if spec.missing:
            doc["systems"].append({"system": system, "status": f"missing: {spec.missing}", "points": []})
            continue
        try:
            server = launch(spec, port, out.parent / "logs")
        except RuntimeError as e:
            doc["systems"].append({"system": system, "status": str(e), "points": []})
            continue
        try:
            finished = run_with_progress(
                lambda progress: sweep_system(server.url, system, workload, config, doc, out, progress),  # noqa: B023
                len(points),
            )
        except (Unreachable, ValueError) as e:
            doc["systems"][-1]["status"] = f"failed: {e}"
            finished = True
        finally:
            server.stop()
        doc["systems"][-1]["command"] = spec.cmd  # the configuration it ran in
        if not finished:
            doc["interrupted"] = True
            break
    return doc


def run_with_progress(make, num_points: int) -> bool:
    """Run one system's sweep with a progress bar; False when Ctrl-C stopped it."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), transient=False
    ) as bar:
        tasks: dict[str, TaskID] = {}

        def progress(system: str, record) -> None:
            if system not in tasks:
                tasks[system] = bar.add_task(f"{system}: requests", total=None)
            bar.advance(tasks[system])

        try:
            asyncio.run(make(progress))
        except KeyboardInterrupt:
            bar.console.print("[yellow]interrupted: the points finished before are written[/]")
            return False
    return True


def print_summary(doc: dict) -> None:
    table = Table(
        title=f"{doc['workload']['name']} workload, SLO TTFT<={doc['slo']['ttft_s']}s "
        f"TPOT<={doc['slo']['tpot_s']}s, ${doc['price_per_hour']}/h"
    )
    for col in (
        "system",
        "point",
        "ok/failed",
        "out tok/s",
        "tok/s/user",
        "TTFT p50 ms",
        "TPOT p50 ms",
        "goodput",
        "$/Mtok out",
        "J/tok out",
    ):
        table.add_column(col)
    for entry in doc["systems"]:
        if entry["status"] != "ok":
            table.add_row(entry["system"], "-", entry["status"], *["-"] * 7)
        for p in entry["points"]:
            s = p["summary"]
            table.add_row(
                entry["system"],
                str(p["concurrency"] or p["rate"]),
                f"{s['completed']}/{sum(s['failed'].values())}",
                _f(s["output_tok_s"]),
                _f(s["interactivity"]),
                _f(_ms(s["ttft_s"]["p50"])),
                _f(_ms(s["tpot_s"]["p50"])),
                _f(s["goodput_fraction"], 2),
                _f(s["usd_per_mtok_output"], 3),
                _f(s["joules_per_token_output"], 3),
            )
    Console(stderr=True).print(table)


def _ms(x):
    return None if x is None else 1000 * x


def _f(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def exit_code(doc: dict) -> int:
    """0 when every system ran and completed requests; 1 otherwise (the report still says what happened)."""
    ok = all(e["status"] == "ok" and e["points"] for e in doc["systems"]) and doc["systems"]
    return 0 if ok else 1
