"""Turn sweep documents into a report: a Markdown table, two PNG plots and the merged JSON.

The report compares systems measured on one machine under one workload, so merging refuses documents whose
workload, SLO or price differ: their goodput and $/Mtok would not be comparable. Throughput is plotted per
device, so that a multi-device system is not flattered by its device count; a system or machine may say how
many devices it used with an optional "devices" field (1 if absent).
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from tokenfab.bench.records import SCHEMA_VERSION
from tokenfab.bench.stats import best_within_slo, pareto_front

SWEEP_KIND = "tokenfab-bench-sweep"
KNOWN_SCHEMA_VERSIONS = frozenset({SCHEMA_VERSION})
THROUGHPUT_PNG = "throughput_vs_interactivity.png"
COST_PNG = "cost_vs_interactivity.png"
DASH = "—"
_MACHINE_UNITS = (
    ("cores", "{:g} cores"),
    ("memory_gb", "{:g} GB"),
    ("read_gb_s", "read {:g} GB/s"),
    ("fp32_gflops", "fp32 {:g} GFLOP/s"),
)


@dataclass(frozen=True, slots=True)
class PlotPoint:
    """One sweep point that has an interactivity value, in the units the plots and the frontier use."""

    system: str
    label: str
    """Its load: "c=4" for a concurrency point, "2 req/s" for a rate point."""
    concurrency: int | None
    rate: float | None
    interactivity: float
    """tok/s/user (x axis)."""
    throughput_per_device: float | None
    """Output tok/s divided by the devices the system used (y axis of the throughput plot)."""
    usd_per_mtok_output: float | None


def load_runs(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Read sweep documents, failing on the first one that is not a sweep this code knows how to read."""
    return [_load_one(Path(p)) for p in paths]


def _load_one(path: Path) -> dict[str, Any]:
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(doc, dict) or doc.get("kind") != SWEEP_KIND:
        kind = doc.get("kind") if isinstance(doc, dict) else type(doc).__name__
        raise ValueError(f"{path}: kind is {kind!r}, expected {SWEEP_KIND!r}")
    version = doc.get("schema_version")
    if version not in KNOWN_SCHEMA_VERSIONS:
        raise ValueError(f"{path}: schema_version {version!r} is not one of {sorted(KNOWN_SCHEMA_VERSIONS)}")
    return doc


def merge(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One document from sweeps of the same workload; a system measured twice keeps its later measurement.

    Systems stay in the order they first appeared; top-level fields (machine, created, ...) come from the
    last document. The inputs are not modified.
    """
    if not runs:
        raise ValueError("merge needs at least one sweep document")
    first = runs[0]
    for i, run in enumerate(runs[1:], start=1):
        for key in ("workload", "slo", "price_per_hour"):
            if run.get(key) != first.get(key):
                raise ValueError(f"cannot merge: run {i} has {key} {run.get(key)!r}, run 0 has {first.get(key)!r}")
    by_name: dict[str, dict[str, Any]] = {}
    for run in runs:
        for system in run.get("systems", []):
            by_name[system["system"]] = system
    merged = copy.deepcopy({k: v for k, v in runs[-1].items() if k != "systems"})
    merged["systems"] = [copy.deepcopy(s) for s in by_name.values()]
    return merged


def plot_points(doc: dict[str, Any], system: dict[str, Any]) -> list[PlotPoint]:
    """The system's points that have a finite tok/s/user, in sweep order."""
    devices = _devices(doc, system)
    out = []
    for point in system.get("points", []):
        s = point.get("summary", {})
        x = _finite(s.get("interactivity"))
        if x is None:
            continue
        tput = _finite(s.get("output_tok_s"))
        out.append(
            PlotPoint(
                system=system["system"],
                label=_load_label(point),
                concurrency=point.get("concurrency"),
                rate=point.get("rate"),
                interactivity=x,
                throughput_per_device=None if tput is None else tput / devices,
                usd_per_mtok_output=_finite(s.get("usd_per_mtok_output")),
            )
        )
    return out


def frontier(points: Sequence[PlotPoint]) -> list[PlotPoint]:
    """Of points with a throughput, those on the throughput-vs-interactivity Pareto frontier, sorted by x."""
    usable = [p for p in points if p.throughput_per_device is not None]
    front = pareto_front([(p.interactivity, cast(float, p.throughput_per_device)) for p in usable])
    return [usable[i] for i in front]


def _devices(doc: dict[str, Any], system: dict[str, Any]) -> float:
    return system.get("devices") or doc.get("machine", {}).get("devices") or 1


def _finite(v: Any) -> float | None:
    return float(v) if isinstance(v, (int, float)) and math.isfinite(v) else None


def _load_label(point: dict[str, Any]) -> str:
    # A rate sweep may also cap concurrency; the rate is then what varies, so it names the point.
    if point.get("rate") is not None:
        return f"{point['rate']:g} req/s"
    return f"c={point.get('concurrency')}"


def markdown(doc: dict[str, Any]) -> str:
    """Header, one row per (system, point), the systems that did not run, and each system's frontier."""
    parts = [_header(doc), _table(doc)]
    bad = [s for s in doc.get("systems", []) if s.get("status", "ok") != "ok"]
    if bad:
        lines = [f"- **{_cell(s['system'])}**: {s.get('status')}" for s in bad]
        parts.append("## Missing or failed\n\n" + "\n".join(lines))
    parts.append(_goodput_section(doc))
    parts.append(_frontier_section(doc))
    return "\n\n".join(parts) + "\n"


def _header(doc: dict[str, Any]) -> str:
    w, slo, m = doc.get("workload", {}), doc.get("slo", {}), doc.get("machine", {})
    name = w.get("name", "?")
    workload = ", ".join(f"{k}={v}" for k, v in w.items() if k != "name")
    machine = [str(m.get("cpu", "?"))] + [f.format(m[k]) for k, f in _MACHINE_UNITS if m.get(k) is not None]
    machine += [f"{k}={v}" for k, v in m.items() if k != "cpu" and k not in dict(_MACHINE_UNITS)]
    price = doc.get("price_per_hour")
    lines = [
        f"# Benchmark: {name} workload",
        "",
        f"- **Machine:** {', '.join(machine)}",
        f"- **Workload:** {name}" + (f" ({workload})" if workload else ""),
        f"- **SLO:** TTFT ≤ {_g(slo.get('ttft_s'))} s, TPOT ≤ {_g(_scale(slo.get('tpot_s'), 1000))} ms",
        f"- **Price:** ${_g(price)} per device-hour" if price is not None else "- **Price:** not stated",
    ]
    if doc.get("created"):
        lines.append(f"- **Run:** {doc['created']}")
    return "\n".join(lines)


_COLUMNS = (
    "system",
    "load",
    "completed / failed",
    "output tok/s",
    "tok/s/user",
    "TTFT p50 / p99 (ms)",
    "TPOT p50 / p99 (ms)",
    "goodput",
    "$/Mtok output",
    "J/token",
)


def _table(doc: dict[str, Any]) -> str:
    rows = [_row(s["system"], p) for s in doc.get("systems", []) for p in s.get("points", [])]
    head = ["| " + " | ".join(_COLUMNS) + " |", "|" + "---|" * len(_COLUMNS)]
    if not rows:
        return "\n".join(head + ["| " + " | ".join([DASH] * len(_COLUMNS)) + " |"])
    return "\n".join(head + ["| " + " | ".join(r) + " |" for r in rows])


def _row(system: str, point: dict[str, Any]) -> list[str]:
    s = point.get("summary", {})
    joules = _num(s.get("joules_per_token_output"))
    if joules != DASH and s.get("energy_source"):
        joules += f" ({s['energy_source']})"
    return [
        _cell(system),
        _load_label(point),
        _completed_failed(s),
        _num(s.get("output_tok_s"), ".1f"),
        _num(s.get("interactivity"), ".1f"),
        _ms_pair(s.get("ttft_s")),
        _ms_pair(s.get("tpot_s")),
        _num(s.get("goodput_fraction"), ".0%"),
        _num(s.get("usd_per_mtok_output")),
        _cell(joules),
    ]


def _completed_failed(s: dict[str, Any]) -> str:
    failed = s.get("failed") or {}
    if isinstance(failed, dict):
        total = sum(failed.values())
        detail = ", ".join(f"{k} {v}" for k, v in sorted(failed.items()) if v)
        return f"{s.get('completed', 0)} / {total}" + (f" ({detail})" if detail else "")
    return f"{s.get('completed', 0)} / {failed}"


def _ms_pair(dist: dict[str, Any] | None) -> str:
    dist = dist or {}
    return f"{_num(_scale(dist.get('p50'), 1000), '.1f')} / {_num(_scale(dist.get('p99'), 1000), '.1f')}"


def _goodput_section(doc: dict[str, Any]) -> str:
    """Per system, the highest measured request rate at which at least 90 % of requests met the SLO."""
    lines = [
        "## Goodput",
        "",
        "Highest completed-request rate among the points where >= 90 % of requests met the SLO (TTFT and TPOT).",
        "",
    ]
    for system in doc.get("systems", []):
        best = best_within_slo(system.get("points", []), "request_rate")
        if best is None:
            lines.append(f"- **{_cell(system['system'])}**: no point met the SLO")
        else:
            s = best["summary"]
            lines.append(
                f"- **{_cell(system['system'])}**: {_num(s.get('request_rate'))} req/s "
                f"({_load_label(best)}, {_num(s.get('output_tok_s'), '.1f')} output tok/s)"
            )
    return "\n".join(lines)


def _frontier_section(doc: dict[str, Any]) -> str:
    lines = [
        "## Pareto frontier",
        "",
        "Points no other point of the same system beats on both tok/s/user and output tok/s per device.",
        "",
    ]
    for system in doc.get("systems", []):
        if not system.get("points"):
            continue
        # Listed by load, not by x, so the line reads like the sweep that produced it.
        front = sorted(frontier(plot_points(doc, system)), key=_load_key)
        if not front:
            lines.append(f"- **{_cell(system['system'])}**: no point with tok/s/user and throughput")
        elif all(p.rate is None for p in front):
            lines.append(
                f"- **{_cell(system['system'])}**: concurrency " + ", ".join(str(p.concurrency) for p in front)
            )
        else:
            lines.append(f"- **{_cell(system['system'])}**: " + ", ".join(p.label for p in front))
    return "\n".join(lines)


def _num(v: Any, fmt: str | None = None) -> str:
    """A number for the table; without a format, three significant digits and never an exponent."""
    x = _finite(v)
    if x is None:
        return DASH
    if fmt is not None:
        return format(x, fmt)
    if x == 0:
        return "0"
    decimals = max(0, 2 - math.floor(math.log10(abs(x))))
    return f"{x:,.{decimals}f}"


def fixed(v: Any, digits: int = 1) -> str:
    """A number with `digits` decimals for a benchmark's table, or "-"."""
    x = _finite(v)
    return "-" if x is None else f"{x:.{digits}f}"


def millis(seconds: Any) -> str:
    """Seconds as whole milliseconds for a benchmark's table, or "-"."""
    x = _finite(seconds)
    return "-" if x is None else f"{x * 1e3:.0f} ms"


def _scale(v: Any, factor: float) -> float | None:
    x = _finite(v)
    return None if x is None else x * factor


def _g(v: Any) -> str:
    x = _finite(v)
    return "?" if x is None else f"{x:g}"


def _cell(text: str) -> str:
    return str(text).replace("|", "\\|")


def plots(doc: dict[str, Any], out_dir: str | Path) -> list[Path]:
    """Write the throughput and the cost plot into out_dir; points without tok/s/user (or cost) are skipped."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_system = [(s["system"], plot_points(doc, s)) for s in doc.get("systems", [])]
    by_system = [(name, pts) for name, pts in by_system if pts]
    return [_throughput_plot(doc, by_system, out / THROUGHPUT_PNG), _cost_plot(doc, by_system, out / COST_PNG)]


def _throughput_plot(doc: dict[str, Any], by_system: list[tuple[str, list[PlotPoint]]], path: Path) -> Path:
    fig, ax = _figure(doc)
    for i, (name, pts) in enumerate(by_system):
        pts = sorted((p for p in pts if p.throughput_per_device is not None), key=_load_key)
        if not pts:
            continue
        color = f"C{i % 10}"
        _series(ax, pts, [cast(float, p.throughput_per_device) for p in pts], color, name)
        front = frontier(pts)
        ax.step(
            [p.interactivity for p in front],
            [p.throughput_per_device for p in front],
            where="pre",
            linestyle="--",
            color=color,
            alpha=0.6,
            label=_plain(f"{name} Pareto frontier"),
        )
    ax.set_ylabel("output throughput per device (tok/s)")
    return _save(fig, ax, path)


def _cost_plot(doc: dict[str, Any], by_system: list[tuple[str, list[PlotPoint]]], path: Path) -> Path:
    fig, ax = _figure(doc)
    costs: list[float] = []
    for i, (name, pts) in enumerate(by_system):
        pts = sorted((p for p in pts if p.usd_per_mtok_output is not None), key=_load_key)
        if pts:
            ys = [cast(float, p.usd_per_mtok_output) for p in pts]
            _series(ax, pts, ys, f"C{i % 10}", name)
            costs += ys
    if wants_log_y(costs):
        ax.set_yscale("log")
    price = doc.get("price_per_hour")
    at = f" (at ${_g(price)}/device-hour)" if price is not None else ""
    ax.set_ylabel(_plain(f"$ per million output tokens{at}"))
    return _save(fig, ax, path)


def wants_log_y(values: Sequence[float]) -> bool:
    """Log scale when the values span more than 10x; a linear axis would flatten the cheap end to a line."""
    return bool(values) and min(values) > 0 and max(values) > 10 * min(values)


def _figure(doc: dict[str, Any]):
    from matplotlib.figure import Figure

    # A bare Figure, not pyplot: no global figure registry to leak figures into across calls.
    fig = Figure(figsize=(8, 5.5), dpi=100)
    ax = fig.add_subplot()
    w, m = doc.get("workload", {}), doc.get("machine", {})
    shape = f" ISL {w['isl']} / OSL {w['osl']}" if "isl" in w and "osl" in w else ""
    cores = f", {m['cores']} cores" if m.get("cores") is not None else ""
    ax.set_title(_plain(f"{w.get('name', '?')}{shape} on {m.get('cpu', '?')}{cores}"), fontsize=10)
    ax.set_xlabel("interactivity (tok/s/user)")
    ax.grid(True, alpha=0.3)
    return fig, ax


def _series(ax, pts: list[PlotPoint], ys: list[float], color: str, name: str) -> None:
    ax.plot([p.interactivity for p in pts], ys, marker="o", color=color, label=_plain(name))
    for p, y in zip(pts, ys):
        ax.annotate(p.label, (p.interactivity, y), textcoords="offset points", xytext=(4, 4), fontsize=7)


def _save(fig, ax, path: Path) -> Path:
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no points with tok/s/user", transform=ax.transAxes, ha="center")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _plain(text: str) -> str:
    """Text matplotlib draws as written: a pair of "$" would otherwise switch it into math mode."""
    return text.replace("$", r"\$")


def _load_key(p: PlotPoint) -> tuple[float, float]:
    return (p.rate if p.rate is not None else math.inf, p.concurrency if p.concurrency is not None else math.inf)


def write_report(doc: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write report.md (table plus plot links), the two PNGs and sweep.json into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    throughput_png, cost_png = plots(doc, out)
    md = markdown(doc) + (
        "\n## Plots\n\n"
        f"![output tok/s per device vs tok/s/user]({throughput_png.name})\n\n"
        f"![$/Mtok output vs tok/s/user]({cost_png.name})\n"
    )
    report_md, sweep_json = out / "report.md", out / "sweep.json"
    report_md.write_text(md)
    sweep_json.write_text(json.dumps(doc, indent=2) + "\n")
    return {"report": report_md, "sweep": sweep_json, "throughput_plot": throughput_png, "cost_plot": cost_png}
