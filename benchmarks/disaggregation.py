"""Prefill/decode disaggregation against aggregated serving, with this machine's cores in every configuration: one
replica with all threads, two aggregated replicas behind the kv router, and one prefill + one decode replica (1P1D:
every prompt of two or more uncached blocks computed on the prefill replica, `--disaggregation always`; and
`conditional`, deciding per request from the measured step costs), and two replicas under `--disaggregation auto`
(aggregated until measured SLO misses call for one prefill replica). Two workloads: a mix of long prompts (2,048
tokens, 16 out, one every 12 s) arriving among chatty short requests (128 in, 64 out, 0.5 per second), and random
1024/128 at concurrency 4. Then the KV transports' bandwidth (shm, tcp, nixl where installed), pulling a long
prompt's blocks between two engine cores on the real model, against this machine's memory copy bandwidth.

    .venv/bin/python benchmarks/disaggregation.py      # from the repository root, on a quiet machine (~15 minutes)

Writes disaggregation-<date>.json and .md under benchmarks/reports: TTFT and TPOT p50/p99, goodput at the SLO
(TTFT <= 2 s, TPOT <= 100 ms), output tok/s and $/Mtok, the router's disaggregation decisions, and the transfers.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from router import run, start  # noqa: E402
from tokenfab.bench.report import fixed, millis  # noqa: E402
from tokenfab.platform import cpu_isa, machine  # noqa: E402

CONFIGS = {
    "1 replica (2 threads)": ["--replicas", "1"],
    "2 aggregated replicas (kv)": ["--replicas", "2", "--router", "kv"],
    "1P1D always": ["--prefill-replicas", "1", "--decode-replicas", "1", "--disaggregation", "always"],
    "1P1D conditional": ["--prefill-replicas", "1", "--decode-replicas", "1", "--disaggregation", "conditional"],
    "2 replicas auto": ["--replicas", "2", "--disaggregation", "auto"],
}


def mix_trace(path: Path, seconds: float, chat_rate: float, long_every: float, seed: int = 0) -> Path:
    """Chatty requests (Poisson, `chat_rate` per second) and a long prompt every `long_every` seconds."""
    rng = random.Random(seed)
    rows, t = [], 0.0
    while t < seconds:
        rows.append({"timestamp": round(t, 3), "input_length": 128, "output_length": 64})
        t += rng.expovariate(chat_rate)
    rows += [
        {"timestamp": round(long_every * (k + 0.5), 3), "input_length": 2048, "output_length": 16}
        for k in range(int(seconds / long_every))
    ]
    rows.sort(key=lambda r: r["timestamp"])
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def workloads(tmp: Path, seconds: float, slo: list[str]) -> dict[str, list[str]]:
    trace = mix_trace(tmp / "mix.jsonl", seconds, chat_rate=0.5, long_every=12.0)
    return {
        "mix: long prompts among chat": [
            *("--workload", "trace", "--trace", str(trace), "--rate", "1", "--warmup", "0"),  # its own arrival times
            *slo,
        ],
        "random 1024/128": [
            *("--workload", "random", "--isl", "1024", "--osl", "128", "--concurrency", "4", "--num-requests", "16"),
            *slo,
        ],
    }


def transfer_bandwidth(prompt_tokens: int = 3072, repeats: int = 5) -> list[dict]:
    """Pull a long prompt's KV between two engine cores of the real default model, per transport."""
    import torch

    from tokenfab.config import EngineConfig
    from tokenfab.engine.core import EngineCore
    from tokenfab.engine.messages import CoreRequest
    from tokenfab.engine.types import KVTransferParams, SamplingParams

    big = torch.ones(256 * 2**20, dtype=torch.uint8)
    copy = torch.zeros_like(big)
    copy.copy_(big)  # every page touched before the timing
    started = time.perf_counter()
    for _ in range(repeats):
        copy.copy_(big)
    memcpy = big.numel() * repeats / (time.perf_counter() - started)
    rows = [{"transport": "memory copy (torch, 256 MiB)", "gb_s": memcpy / 1e9}]
    prompt = [5 + (i * 7) % 5000 for i in range(prompt_tokens)]
    from tokenfab.engine.kv_transfer.transport import nixl_api

    for transport in ("shm", "tcp", *(("nixl",) if nixl_api() is not None else ())):
        config = EngineConfig(kv_transport=transport, kv_cache_memory_gb=0.5, max_model_len=prompt_tokens + 64)
        p, d = EngineCore(config), EngineCore(config)
        for k in range(repeats):
            leg = CoreRequest(
                f"p{k}",
                prompt,
                SamplingParams(max_tokens=1, temperature=0),
                time.monotonic(),
                kv_transfer=KVTransferParams(do_remote_decode=True),
            )
            p.add_request(leg)
            params = None
            while p.has_unfinished():
                params = next((o.kv_transfer for o in p.step() if o.kv_transfer is not None), params)
            d.reset_prefix_cache()
            d.add_request(
                CoreRequest(
                    f"d{k}", prompt, SamplingParams(max_tokens=1, temperature=0), time.monotonic(), kv_transfer=params
                )
            )
            while d.has_unfinished():
                d.step()
            p.tick()
            p.reset_prefix_cache()
        s = d.stats().transfer
        rows.append(
            {
                "transport": transport,
                "pulls": s.pulls,
                "mib_per_pull": s.pulled_bytes / max(1, s.pulls) / 2**20,
                "ms_per_pull": s.pull_seconds / max(1, s.pulls) * 1e3,
                "gb_s": s.pulled_bytes / s.pull_seconds / 1e9 if s.pull_seconds else None,
            }
        )
        p.close()
        d.close()
    for row in rows:
        row["of_memcpy"] = row["gb_s"] / memcpy * 1e9 if row.get("gb_s") else None
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="in total, split between the replicas")
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--seconds", type=float, default=64.0, help="length of the mix trace")
    ap.add_argument("--workloads", default="mix,random", help="of: mix, random")
    ap.add_argument("--slo-ttft", type=float, default=2.0)
    ap.add_argument("--slo-tpot", type=float, default=0.1)
    ap.add_argument(
        "--slo-to-servers", action="store_true", help="serve with the SLO too (the router and auto aim for it)"
    )
    ap.add_argument("--skip-bandwidth", action="store_true", help="leave out the transports' bandwidth")
    ap.add_argument("--only-bandwidth", action="store_true", help="only the transports' bandwidth")
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "reports" / f"disaggregation-{date.today()}")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        slo = ["--slo-ttft", str(args.slo_ttft), "--slo-tpot", str(args.slo_tpot)]
        chosen = args.workloads.split(",")
        loads = {k: v for k, v in workloads(Path(tmp), args.seconds, slo).items() if k.split()[0].strip(":") in chosen}
        for config in [] if args.only_bandwidth else args.configs.split(","):
            flags = [*CONFIGS[config], "--max-model-len", "4096", *(slo if args.slo_to_servers else [])]
            server = start(flags, args.kv_cache_memory_gb, Path(tmp))
            try:
                for name, workload in loads.items():
                    s = run(server.url, workload, Path(tmp) / "point.json")
                    metrics = httpx.get(f"{server.url}/metrics").text
                    listed = httpx.get(f"{server.url}/replicas").json()
                    rows.append(
                        {
                            "config": config,
                            "workload": name,
                            "completed": s["completed"],
                            "sent": s["sent"],
                            "ttft_p50": s["ttft_s"]["p50"],
                            "ttft_p99": s["ttft_s"]["p99"],
                            "tpot_p50": s["tpot_s"]["p50"],
                            "tpot_p99": s["tpot_s"]["p99"],
                            "goodput_fraction": s["goodput_fraction"],
                            "output_tok_s": s["output_tok_s"],
                            "usd_per_mtok_output": s["usd_per_mtok_output"],
                            "decisions": _counters(metrics, "tokenfab:router_disaggregation_total", "decision"),
                            "pulled_mib": _counters(metrics, "tokenfab:kv_transfer_pulled_bytes_total", None).get("", 0)
                            / 2**20,
                            "disaggregation": listed.get("disaggregation"),
                        }
                    )
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                server.stop()
    bandwidth = [] if args.skip_bandwidth else transfer_bandwidth()
    doc = {
        "command": " ".join(sys.argv[1:]),
        "machine": machine.describe(),
        "isa_levels": cpu_isa.describe()["isa_levels"],
        "threads": os.cpu_count(),
        "kv_cache_memory_gb_total": args.kv_cache_memory_gb,
        "slo": {"ttft_s": args.slo_ttft, "tpot_s": args.slo_tpot, "given_to_servers": args.slo_to_servers},
        "rows": rows,
        "transfer": bandwidth,
    }
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    args.out.with_suffix(".md").write_text(markdown(doc))
    print(markdown(doc))


def _counters(metrics: str, name: str, label: str | None) -> dict[str, float]:
    """Values of one counter family (summed per `label` value, over the other labels)."""
    out: dict[str, float] = {}
    for line in metrics.splitlines():
        if not line.startswith(name):
            continue
        head, value = line.rsplit(" ", 1)
        key = ""
        if label is not None and f'{label}="' in head:
            key = head.split(f'{label}="', 1)[1].split('"', 1)[0]
        out[key] = out.get(key, 0.0) + float(value)
    return out


def markdown(doc: dict) -> str:
    lines = [
        f"# Prefill/decode disaggregation vs aggregated — {doc['machine']['cpu']}, Gemma 3 270M, 2 threads in total",
        "",
        f"`benchmarks/disaggregation.py{' ' + doc['command'] if doc['command'] else ''}`; KV budget "
        f"{doc['kv_cache_memory_gb_total']} GiB in total; SLO TTFT <= {doc['slo']['ttft_s']} s, TPOT <= "
        f"{doc['slo']['tpot_s'] * 1e3:.0f} ms"
        f"{' (the servers given it too)' if doc['slo'].get('given_to_servers') else ''}. CPU ISA levels: "
        f"{', '.join(doc.get('isa_levels', [])) or 'not recorded'}.",
        "",
    ]
    for workload in dict.fromkeys(r["workload"] for r in doc["rows"]):
        lines += [
            f"## {workload}",
            "",
            "| configuration | TTFT p50 / p99 | TPOT p50 / p99 | goodput | output tok/s | $/Mtok | prompts remote / "
            "local / fallback | KV pulled |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for r in (r for r in doc["rows"] if r["workload"] == workload):
            d = r["decisions"]
            roles = (r.get("disaggregation") or {}).get("switches")
            config = f"{r['config']} (switches: {roles or 'none'})" if "auto" in r["config"] else r["config"]
            local = d.get("local (short)", 0) + d.get("local (sooner here)", 0)
            split = f"{d.get('remote', 0):.0f} / {local:.0f} / {d.get('fallback', 0):.0f}" if d else "—"
            lines.append(
                f"| {config} | {millis(r['ttft_p50'])} / {millis(r['ttft_p99'])} | {millis(r['tpot_p50'])} / "
                f"{millis(r['tpot_p99'])} | {fixed(r['goodput_fraction'], 2)} ({r['completed']}/{r['sent']}) | "
                f"{fixed(r['output_tok_s'], 1)} | {fixed(r['usd_per_mtok_output'], 2)} | {split} | "
                f"{r['pulled_mib']:.0f} MiB |"
            )
        lines.append("")
    if not doc["transfer"]:
        return "\n".join(lines)
    lines += [
        "## KV transfer bandwidth",
        "",
        "A 3,072-token prompt's blocks pulled from one engine core into another (`tokenfab.engine.kv_transfer`), "
        "against a plain memory copy on this machine:",
        "",
        "| transport | MiB per pull | ms per pull | GB/s | of memory copy |",
        "|---|---|---|---|---|",
    ]
    for t in doc["transfer"]:
        lines.append(
            f"| {t['transport']} | {fixed(t.get('mib_per_pull'), 1)} | {fixed(t.get('ms_per_pull'), 1)} | "
            f"{fixed(t['gb_s'], 2)} | {fixed(t['of_memcpy'], 2)} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
