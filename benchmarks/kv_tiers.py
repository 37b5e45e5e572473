"""KV tiers side by side: `tokenfab serve` with a KV pool a quarter of what agentic sessions need, without tiers, with
the host-memory tier, and with the disk tier; and llama.cpp's server with the same KV size and its host-memory prompt
cache (`--cache-ram`). On agentic sessions with think time (returning turns find their prefix evicted from the pool)
and on random 1024/128 (no reuse: what the tiers cost when they cannot help).

    .venv/bin/python benchmarks/kv_tiers.py          # from the repository root, on a quiet machine (~20 minutes)

Writes kv-tiers-<date>.json and .md under benchmarks/reports: prefix hit rate (and by tier, from the server's
counters), TTFT p50/p99 of returning turns and of all requests, TPOT p50, output tok/s, $/Mtok, and the targets'
ratios.
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

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tokenfab.bench.launch import Launched, ServerSpec, free_port, launch, server_spec  # noqa: E402
from tokenfab.bench.report import fixed, millis  # noqa: E402
from tokenfab.platform import cpu_isa, machine  # noqa: E402

SESSIONS, TURNS, PREFIX, TOOL, REPLY, CONCURRENCY, THINK = 32, 6, 512, 128, 32, 16, 1.0
WORKLOADS = {
    "agentic": [
        "--workload", "agentic", "--sessions", str(SESSIONS), "--turns", str(TURNS), "--prefix-len", str(PREFIX),
        "--isl", str(TOOL), "--osl", str(REPLY), "--think-time", str(THINK), "--concurrency", str(CONCURRENCY),
    ],
    "random 1024/128": [
        "--workload", "random", "--isl", "1024", "--osl", "128", "--concurrency", "4", "--num-requests", "16",
    ],
}  # fmt: skip
TOKENFAB = [sys.executable, "-m", "tokenfab.cli"]
TIER_COUNTERS = ("kv_tier_host_hit_tokens", "kv_tier_disk_hit_tokens", "kv_tier_loads_declined")


def kv_bytes_per_token() -> int:
    """Pool bytes one token takes in every window group (Gemma 3 270M in the default dtype)."""
    from tokenfab.attention.backend import KVCache
    from tokenfab.config import EngineConfig
    from tokenfab.engine.worker import kv_groups
    from tokenfab.models.loading import resolve_model

    arch = resolve_model(None).arch
    dtype, _ = EngineConfig().resolve_weights()
    return sum(
        KVCache.bytes_per_block(len(g.layers), 1, arch.num_kv_heads, arch.head_dim, dtype) for g in kv_groups(arch)
    )


def configs(pool_gb: float, disk_dir: str) -> dict[str, list[str] | None]:
    pool = ["--kv-cache-memory-gb", f"{pool_gb:.4f}"]
    return {
        "tokenfab: no tiers": pool,
        "tokenfab: host tier 2 GB": [*pool, "--kv-host-gb", "2"],
        "tokenfab: host tier + write-through at 2 hits": [*pool, "--kv-host-gb", "2", "--kv-write-through-hits", "2"],
        "tokenfab: disk tier": [*pool, "--kv-disk-dir", disk_dir, "--kv-disk-gb", "4"],
        "llama.cpp: --cache-ram 2048": None,  # started by `llamacpp`
    }


def start(flags: list[str], log_dir: Path) -> Launched:
    port = free_port()
    cmd = [*TOKENFAB, "serve", "--port", str(port), *flags]
    return launch(ServerSpec("tokenfab", cmd, dict(os.environ)), port, log_dir)


LLAMACPP_SLOT_TOKENS = 2048
"""llama.cpp's context per slot. With a KV of the pool's size (a unified cache of pool_tokens) it fails requests once
the cache is full (31 of 63 completed in a trial run), so it gets a slot per session at a time, each long enough for a
whole session: more KV memory than tokenfab's pool, its best configuration here."""


def llamacpp(log_dir: Path) -> Launched:
    """llama.cpp with 16 slots of 2,048 tokens and its host-memory prompt cache (`--cache-ram`)."""
    port = free_port()
    spec = server_spec(
        "llama.cpp", port, REPO / ".peers", os.cpu_count() or 1, CONCURRENCY, LLAMACPP_SLOT_TOKENS,
        ["--cache-ram", "2048"],
    )  # fmt: skip
    return launch(spec, port, log_dir)


def counters(url: str) -> dict[str, float]:
    """The server's tier counters (zero where it has none)."""
    try:
        text = httpx.get(f"{url}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    out = dict.fromkeys(TIER_COUNTERS, 0.0)
    for line in text.splitlines():
        for name in TIER_COUNTERS:
            if line.startswith(f"tokenfab:{name}_total{{") or line.startswith(f"tokenfab:{name}{{"):
                out[name] += float(line.rsplit(" ", 1)[1])
    return out


def run(url: str, workload: list[str], out: Path) -> dict:
    subprocess.run(
        [*TOKENFAB, "bench", "serve", "--url", url, *workload, "--out", str(out)], check=True, stdout=subprocess.DEVNULL
    )
    return json.loads(out.read_text())["systems"][0]["points"][0]["summary"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pool-fraction", type=float, default=0.25, help="pool size / the agentic sessions' KV")
    ap.add_argument("--configs", default=None, help="comma-separated subset of the configurations")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "reports" / f"kv-tiers-{date.today()}")
    args = ap.parse_args()
    per_token = kv_bytes_per_token()
    session_tokens = PREFIX + TURNS * (TOOL + REPLY)
    workload_tokens = SESSIONS * session_tokens
    pool_tokens = int(workload_tokens * args.pool_fraction)
    pool_gb = pool_tokens * per_token / 2**30
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        table = configs(pool_gb, str(Path(tmp) / "kv-disk"))
        chosen = args.configs.split(",") if args.configs else list(table)
        for config in chosen:
            flags = table[config]
            server = llamacpp(Path(tmp)) if flags is None else start(flags, Path(tmp))
            try:
                for name in args.workloads.split(","):
                    before = counters(server.url)
                    s = run(server.url, WORKLOADS[name], Path(tmp) / "point.json")
                    after = counters(server.url)
                    tier = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in TIER_COUNTERS} if after else {}
                    rows.append(
                        {
                            "config": config,
                            "workload": name,
                            "prefix_cache_hit_rate": s["prefix_cache_hit_rate"],
                            "host_hit_tokens": tier.get("kv_tier_host_hit_tokens"),
                            "disk_hit_tokens": tier.get("kv_tier_disk_hit_tokens"),
                            "loads_declined": tier.get("kv_tier_loads_declined"),
                            "input_tokens": s["input_tokens"],
                            "returning_ttft_p50": s["returning_ttft_s"]["p50"],
                            "returning_ttft_p99": s["returning_ttft_s"]["p99"],
                            "ttft_p50": s["ttft_s"]["p50"],
                            "ttft_p99": s["ttft_s"]["p99"],
                            "tpot_p50": s["tpot_s"]["p50"],
                            "output_tok_s": s["output_tok_s"],
                            "usd_per_mtok_output": s["usd_per_mtok_output"],
                            "completed": s["completed"],
                            "sent": s["sent"],
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                server.stop()
    doc = {
        "machine": machine.describe(),
        "isa_levels": cpu_isa.describe()["isa_levels"],
        "workloads": WORKLOADS,
        "kv_bytes_per_token": per_token,
        "agentic_kv_tokens": workload_tokens,
        "pool_tokens": pool_tokens,
        "pool_gb": pool_gb,
        "rows": rows,
    }
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    args.out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


def markdown(doc: dict) -> str:
    lines = [
        "# KV tiers: returning agentic turns with the pool a quarter of the sessions' KV",
        "",
        f"{doc['machine']['cpu']} ({doc['machine']['cores']} cores; ISA levels {', '.join(doc['isa_levels'])}), "
        f"Gemma 3 270M. Agentic: {SESSIONS} sessions x {TURNS} turns ({PREFIX}-token system prompt, {TOOL}-token "
        f"tool outputs, {REPLY}-token replies, {THINK} s think time, {CONCURRENCY} at a time): "
        f"{doc['agentic_kv_tokens']} tokens of KV in all, the pool {doc['pool_tokens']} tokens "
        f"({doc['pool_gb']:.3f} GB at {doc['kv_bytes_per_token']} bytes/token). "
        "Command: `.venv/bin/python benchmarks/kv_tiers.py`.",
        "",
        "| workload | configuration | hit rate | host / disk hit tokens | returning TTFT p50 | p99 | TTFT p50 | "
        "TPOT p50 | output tok/s | $/Mtok out |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["rows"]:
        tiers = f"{r['host_hit_tokens']:.0f} / {r['disk_hit_tokens']:.0f}" if r["host_hit_tokens"] is not None else "-"
        lines.append(
            f"| {r['workload']} | {r['config']} | {fixed(r['prefix_cache_hit_rate'], 3)} | {tiers} | "
            f"{millis(r['returning_ttft_p50'])} | {millis(r['returning_ttft_p99'])} | {millis(r['ttft_p50'])} | "
            f"{millis(r['tpot_p50'])} | {fixed(r['output_tok_s'])} | {fixed(r['usd_per_mtok_output'], 2)} |"
        )
    by = {(r["workload"], r["config"]): r for r in doc["rows"]}

    def ratio(workload: str, a: str, b: str, key: str) -> str:
        x, y = by.get((workload, a)), by.get((workload, b))
        return f"{x[key] / y[key]:.2f}" if x and y and x[key] and y[key] else "-"

    none, host, disk = "tokenfab: no tiers", "tokenfab: host tier 2 GB", "tokenfab: disk tier"
    llama = "llama.cpp: --cache-ram 2048"
    lines += ["", "Targets:"]
    for tier in (host, disk):
        lines.append(
            f"- agentic, {tier} returning TTFT p50 / no tiers': "
            f"{ratio('agentic', tier, none, 'returning_ttft_p50')} (<= 0.4)"
        )
    for tier in (host, disk):
        for w in ("agentic", "random 1024/128"):
            lines.append(f"- {w}, {tier} throughput / no tiers': {ratio(w, tier, none, 'output_tok_s')} (>= 0.97)")
    wt = "tokenfab: host tier + write-through at 2 hits"
    lines += [
        "",
        "Write policy (host tier): write-through at 2 hits / write-back only — agentic returning TTFT p50 "
        f"{ratio('agentic', wt, host, 'returning_ttft_p50')}, throughput {ratio('agentic', wt, host, 'output_tok_s')}; "
        f"random 1024/128 throughput {ratio('random 1024/128', wt, host, 'output_tok_s')}",
    ]
    lines += [
        "",
        f"Against llama.cpp ({CONCURRENCY} slots of {LLAMACPP_SLOT_TOKENS} tokens, more KV than tokenfab's pool, and "
        "its host-memory prompt cache):",
        f"- agentic, host tier returning TTFT p50 / llama.cpp's: {ratio('agentic', host, llama, 'returning_ttft_p50')}"
        f"; throughput: {ratio('agentic', host, llama, 'output_tok_s')}",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
