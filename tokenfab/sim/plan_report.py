"""`tokenfab plan`'s inputs and outputs: replica variants from profiles and the GPU catalogue, and the plan as
JSON, Markdown (the chosen `tokenfab serve` command line, runners-up, frontier) and a frontier plot."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from tokenfab.bench.sweep import new_document
from tokenfab.platform.prices import PROFILES
from tokenfab.sim.planner import Plan, Variant
from tokenfab.sim.roofline import GPUS, roofline_cost, roofline_shape
from tokenfab.sim.run import SimLoad, shape_of
from tokenfab.sim.simulator import ReplicaShape
from tokenfab.sim.step_cost import StepCostModel

CPU_BATCH_LIMITS = (16, 32)
GPU_BATCH_LIMITS = (64, 256)


def profile_flags(meta: dict, batch_limit: bool = True) -> tuple[str, ...]:
    """The engine flags a profile was measured with (recorded since profiles carry them; else rebuilt from its
    threads, weight format, KV budget and batch limit); without `batch_limit`, less --max-num-seqs (the planner
    sets its own)."""
    if "serve_flags" in meta:
        flags = list(meta["serve_flags"])
    else:
        flags = ["--threads", str(meta.get("threads", 1))]
        if meta.get("weights") not in (None, "none"):
            flags += ["--quantization", str(meta["weights"])]
        if meta.get("kv_cache_memory_gb"):
            flags += ["--kv-cache-memory-gb", f"{meta['kv_cache_memory_gb']:g}"]
    shape = meta.get("shape", {})
    for flag, key in (("--max-num-seqs", "max_num_seqs"), ("--max-num-batched-tokens", "max_num_batched_tokens")):
        given = [i for i, f in enumerate(flags) if f == flag or f.startswith(flag + "=")]
        if flag == "--max-num-seqs" and not batch_limit:
            for i in reversed(given):
                del flags[i : i + (1 if "=" in flags[i] else 2)]
        elif not given and key in shape:
            flags += [flag, str(shape[key])]
    return tuple(flags)


def variants(
    profiles: Sequence[Path], model: str | None, devices: Sequence[str], limits: Sequence[int] | None = None
) -> list[Variant]:
    """One variant per profile (as measured) and per GPU kind (roofline, shapes from the model, KV split between
    window groups as the first profile's engine split it)."""
    out = []
    first: ReplicaShape | None = None
    for path in profiles:
        cost = StepCostModel.load(path)
        meta = cost.meta
        shape = shape_of(cost)
        first = first or shape
        own = sorted({*CPU_BATCH_LIMITS, shape.max_num_seqs})
        name = f"{path.name} ({meta.get('threads', '?')} threads, {meta.get('weights', '?')})"
        out.append(Variant(name, cost, shape, float(meta.get("usd_per_hour") or 0.0), profile_flags(meta, False), False,
                           tuple(limits or own)))  # fmt: skip
    unknown = [d for d in devices if d not in GPUS]
    if unknown:
        raise ValueError(f"unknown device {', '.join(unknown)}: expected {', '.join(GPUS)}")
    if devices:
        from tokenfab.models.loading import resolve_model

        arch = resolve_model(model).arch
        for name in devices:
            gpu, price = GPUS[name], PROFILES[name].usd_per_hour
            assert first is not None
            flags = ("--device", "cuda", "--dtype", "bfloat16", "--device-profile", name)
            out.append(Variant(f"{name} (modelled)", roofline_cost(gpu, arch, price), roofline_shape(gpu, arch, first),
                               price, flags, True, tuple(limits or GPU_BATCH_LIMITS)))  # fmt: skip
    return out


def plan_document(args: argparse.Namespace, load: SimLoad, found: list[Variant], plan: Plan, seconds: float) -> dict:
    doc = new_document(load.workload, load.config, None)
    doc["kind"] = "tokenfab-plan"
    doc["load"] = (
        f"open loop, {load.point:g} req/s" if load.open_loop and not any(a is not None for a in load.arrivals)
        else "open loop, the trace's own arrival times" if load.open_loop
        else f"closed loop, concurrency {load.point:g}"
    )  # fmt: skip
    doc["attainment"] = args.attainment
    doc["router"] = args.router
    doc["variants"] = [
        {"name": v.name, "usd_per_hour": v.usd_per_hour, "modelled": v.modelled, "serve_flags": list(v.serve_flags),
         "step_cost": v.cost.coef, "source": v.cost.meta.get("modelled") or "profile",
         "kv_blocks_per_group": v.shape.blocks_per_group, "batch_limits": list(v.batch_limits)}
        for v in found
    ]  # fmt: skip
    doc["search_seconds"] = round(seconds, 2)
    doc["plan"] = plan.as_dict()
    doc["note"] = (
        "simulated: the real scheduler and routing policy in virtual time; profiled variants from measured step "
        "costs, GPU variants from a roofline model (modelled). Not searched: prefill/decode roles, speculation."
    )
    return doc


def write(doc: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "plan.json", "md": out / "plan.md"}
    paths["json"].write_text(json.dumps(doc, indent=1))
    paths["md"].write_text(markdown(doc))
    png = frontier_plot(doc, out / "frontier.png")
    if png is not None:
        paths["png"] = png
    return paths


def markdown(doc: dict) -> str:
    plan, w, m, slo = doc["plan"], doc["workload"], doc["machine"], doc["slo"]
    workload = ", ".join(f"{k} {v}" for k, v in w.items() if k != "name")
    lines = [
        "# Plan: the cheapest deployment that meets the SLO",
        "",
        f"Load: {w['name']} ({workload}), {doc['load']}. SLO: TTFT <= {slo['ttft_s']:g} s and TPOT <= "
        f"{slo['tpot_s']:g} s for >= {doc['attainment']:.0%} of requests; router {doc['router']}. Searched "
        f"{len(plan['candidates'])} deployments in {doc['search_seconds']:.1f} s (simulated; planned on "
        f"{m.get('cpu', '?')}, {m.get('cores', '?')} cores). GPU rows are modelled (roofline), not measured.",
        "",
    ]
    best = plan["best"]
    if best is None:
        lines += ["**No candidate meets the SLO** at this load: raise --max-replicas, add a variant, or relax the SLO.",
                  ""]  # fmt: skip
    else:
        lines += ["Chosen:", "", "```", best["serve_command"], "```", ""]
    header = ["", "deployment", "$/h", "$/Mtok out", "meets SLO", "TTFT p50 / p90", "TPOT p50", "out tok/s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    rows = ([("**chosen**", best)] if best else []) + [("runner-up", c) for c in plan["runners_up"]]
    rows += [("frontier", c) for c in plan["frontier"]]
    lines += [_row(label, c) for label, c in rows]
    lines += ["", "Frontier: no other deployment is both cheaper per token and faster to first token (p90).", ""]
    return "\n".join(lines)


def _row(label: str, c: dict) -> str:
    def ms(x: float | None) -> str:
        return "-" if x is None else f"{x * 1000:.0f} ms"

    cost = "-" if c["usd_per_mtok_output"] is None else f"{c['usd_per_mtok_output']:.3g}"
    tok = "-" if c["output_tok_s"] is None else f"{c['output_tok_s']:.1f}"
    cells = [label, f"{c['replicas']} x {c['variant']}, max_num_seqs {c['max_num_seqs']}", f"{c['usd_per_hour']:.3g}",
             cost, f"{'yes' if c['meets_slo'] else 'no'} ({c['goodput_fraction']:.0%})",
             f"{ms(c['ttft_p50_s'])} / {ms(c['ttft_p90_s'])}", ms(c["tpot_p50_s"]), tok]  # fmt: skip
    return "| " + " | ".join(cells) + " |"


def frontier_plot(doc: dict, path: Path) -> Path | None:
    """Every candidate's $/Mtok against its TTFT p90, those meeting the SLO apart, the frontier drawn through."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None

    def xy(cands: list[dict]) -> tuple[list[float], list[float]]:
        pts = [c for c in cands if c["usd_per_mtok_output"] and c["ttft_p90_s"] is not None]
        return [c["usd_per_mtok_output"] for c in pts], [c["ttft_p90_s"] for c in pts]

    plan = doc["plan"]
    if not xy(plan["candidates"])[0]:
        return None
    fig = Figure(figsize=(8, 5.5), dpi=100)
    ax = fig.add_subplot()
    for meets, marker, label in ((True, "o", "meets the SLO"), (False, "x", "misses the SLO")):
        x, y = xy([c for c in plan["candidates"] if c["meets_slo"] == meets])
        if x:
            ax.scatter(x, y, marker=marker, label=label)
    ax.plot(*xy(plan["frontier"]), color="grey", label="frontier")
    best = plan["best"]
    if best is not None:
        x, y = xy([best])
        ax.scatter(x, y, marker="*", s=250, color="red", label="chosen")
        ax.annotate(f"{best['replicas']} x {best['variant']}", (x[0], y[0]), textcoords="offset points",
                    xytext=(6, 6), fontsize=8)  # fmt: skip
    ax.axhline(doc["slo"]["ttft_s"], linestyle="--", color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel(r"\$ per million output tokens (simulated)")
    ax.set_ylabel("TTFT p90 (s)")
    ax.set_title(f"{doc['workload']['name']}, {doc['load']}", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    return path
