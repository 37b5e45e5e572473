"""Normal requests' latency while abusive clients hit the same server: 5 MB bodies, thousands of idle sockets.

    .venv/bin/python benchmarks/abuse.py        # from the repository root, on a quiet machine (about 18 minutes)

One `tokenfab serve` (the embedded default model, default settings) gets a steady open-loop load of normal
streamed completions (Poisson arrivals, short prompts, 32 output tokens). Phases, each `--phase-s` long and run in
this order: baseline; + a client posting 5 MB prompt bodies back to back (waiting Retry-After when refused, as
OpenAI's clients do); + a client holding 5,000 idle sockets, half of them with half a request head (reopening a
second after the server closes one); both. The four run `--rounds` times in turn (interleaved, so a drift of the
machine falls on every condition alike) and each condition's requests are pooled over the rounds: a p99 of ~100
requests is little more than their maximum, and the baseline's own round-to-round spread is the noise floor. The
abusers run in their own processes at nice 19: on a machine this small they would otherwise compete with the
server for its two cores, which an abuser on another machine does not. Reported per condition: normal requests'
TTFT p50/p99 and the p99's ratio to the baseline's with a bootstrap 90 % interval, TPOT p50, completed/failed,
and what the abusers got. Writes abuse-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import random
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

from tokenfab.bench.client import stream_completion  # noqa: E402
from tokenfab.bench.launch import free_port  # noqa: E402
from tokenfab.bench.stats import percentiles, tpot  # noqa: E402
from tokenfab.platform import machine  # noqa: E402

WORDS = [
    "river",
    "stone",
    "lantern",
    "harbor",
    "meadow",
    "copper",
    "violet",
    "engine",
    "signal",
    "garden",
    "orbit",
    "thunder",
    "marble",
    "falcon",
    "canvas",
    "ember",
    "glacier",
    "saddle",
    "quartz",
    "willow",
]
PHASES = ["baseline", "5 MB bodies", "5,000 idle sockets", "both"]
BOOTSTRAP = 2000


def start_server(port: int, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "tokenfab.cli", "serve", "--port", str(port)]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server did not start; see {log}")


# -- abusers (each in its own process) ----------------------------------------------------------------------------


def big_bodies(url: str, stop: multiprocessing.Event, counts: dict) -> None:
    os.nice(19)
    rng = random.Random(1)
    prompt = " ".join(rng.choice(WORDS) for _ in range(800_000))[:5_000_000]
    body = json.dumps({"prompt": prompt, "max_tokens": 16}).encode()
    statuses: dict[str, int] = {}
    with httpx.Client(base_url=url, timeout=120) as client:
        while not stop.is_set():
            try:
                r = client.post("/v1/completions", content=body, headers={"Content-Type": "application/json"})
                key = str(r.status_code)
            except httpx.HTTPError as e:
                r, key = None, type(e).__name__
            statuses[key] = statuses.get(key, 0) + 1
            if r is not None and r.status_code == 429:
                stop.wait(float(r.headers.get("retry-after", 1)))
    counts.update(statuses)


def idle_sockets(port: int, n: int, stop: multiprocessing.Event, counts: dict) -> None:
    os.nice(19)

    async def hold(i: int, tally: dict) -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                tally["connect_failed"] += 1
                await asyncio.sleep(1.0)
                continue
            tally["opened"] += 1
            if i % 2:
                writer.write(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # half a header
            try:
                await reader.read()  # until the server closes it
            except OSError:
                pass
            writer.close()
            tally["closed_by_server"] += 1
            await asyncio.sleep(1.0)

    async def main() -> dict:
        tally = {"opened": 0, "closed_by_server": 0, "connect_failed": 0}
        tasks = [asyncio.create_task(hold(i, tally)) for i in range(n)]
        while not stop.is_set():
            await asyncio.sleep(0.2)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        return tally

    counts.update(asyncio.run(main()))


# -- the measured load --------------------------------------------------------------------------------------------


async def normal_load(url: str, seconds: float, rate: float, seed: int) -> list:
    rng = random.Random(seed)
    records = []
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as client:
        tasks = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            prompt = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 120)))
            tasks.append(asyncio.create_task(stream_completion(client, "gemma-3-270m", prompt, 0, 32)))
            await asyncio.sleep(rng.expovariate(rate))
        for record, _ in await asyncio.gather(*tasks):
            records.append(record)
    return records


def summary(records: list) -> dict:
    ok = [r for r in records if r.ok]
    ttft = percentiles([r.ttft for r in ok if r.ttft is not None], (50, 99))
    tpots = [t for r in ok if (t := tpot(r)) is not None]
    return {
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "errors": sorted({r.error for r in records if r.error}),
        "ttft_p50_ms": (ttft["p50"] or 0.0) * 1e3,
        "ttft_p99_ms": (ttft["p99"] or 0.0) * 1e3,
        "tpot_p50_ms": (percentiles(tpots, (50,))["p50"] or 0.0) * 1e3,
    }


def run_phase(name: str, url: str, port: int, args: argparse.Namespace, seed: int) -> tuple[dict, list]:
    manager = multiprocessing.Manager()
    stop = manager.Event()
    abusers: list[tuple[str, multiprocessing.Process, dict]] = []
    if name in ("5 MB bodies", "both"):
        counts = manager.dict()
        abusers.append(("bodies", multiprocessing.Process(target=big_bodies, args=(url, stop, counts)), counts))
    if name in ("5,000 idle sockets", "both"):
        counts = manager.dict()
        target = multiprocessing.Process(target=idle_sockets, args=(port, args.sockets, stop, counts))
        abusers.append(("sockets", target, counts))
    for _, p, _ in abusers:
        p.start()
    if abusers:
        time.sleep(5.0)  # let the abuse reach its steady state
    records = asyncio.run(normal_load(url, args.phase_s, args.rate, seed))
    stop.set()
    for _, p, _ in abusers:
        p.join(60)
    result = {"phase": name, **summary(records), "abusers": {k: dict(c) for k, _, c in abusers}}
    manager.shutdown()
    print(json.dumps(result), flush=True)
    return result, records


def ttfts(records: list) -> list[float]:
    return [r.ttft for r in records if r.ok and r.ttft is not None]


def p99_ratio_interval(values: list[float], base: list[float], seed: int = 0) -> tuple[float, float]:
    """5th and 95th percentiles of p99(values) / p99(base) over bootstrap resamples of both."""
    rng = random.Random(seed)
    ratios = []
    for _ in range(BOOTSTRAP):
        a = percentiles(rng.choices(values, k=len(values)), (99,))["p99"]
        b = percentiles(rng.choices(base, k=len(base)), (99,))["p99"]
        if a is not None and b:
            ratios.append(a / b)
    got = percentiles(ratios, (5, 95))
    return got["p5"] or 0.0, got["p95"] or 0.0


def pooled(name: str, rounds: list[dict], records: list, base: list[float]) -> dict:
    """One condition over every round: its requests pooled, the abusers' tallies added."""
    abusers: dict[str, dict[str, int]] = {}
    for r in rounds:
        for who, counts in r["abusers"].items():
            mine = abusers.setdefault(who, {})
            for key, n in counts.items():
                mine[key] = mine.get(key, 0) + n
    lo, hi = p99_ratio_interval(ttfts(records), base)
    return {
        "phase": name,
        **summary(records),
        "rounds_ttft_p99_ms": [r["ttft_p99_ms"] for r in rounds],
        "p99_ratio_interval": [lo, hi],
        "abusers": abusers,
    }


def markdown(doc: dict) -> str:
    base = doc["phases"][0]
    lines = [
        "# Normal requests under abuse",
        "",
        f"{doc['machine']['cpu']} ({doc['machine']['cores']} cores); `tokenfab serve` defaults, Gemma 3 270M; "
        f"{doc['rate']} normal req/s (Poisson, 40-120-word prompts, 32 output tokens, streamed) for "
        f"{doc['phase_s']:.0f} s per phase; the four conditions in turn, {doc['rounds']} rounds, each condition's "
        "requests pooled over the rounds. Command: `.venv/bin/python benchmarks/abuse.py`.",
        "",
        "| condition | completed / failed | TTFT p50 | TTFT p99 (each round) | p99 vs baseline (90 % interval) "
        "| TPOT p50 | abusers got |",
        "|---|---|---|---|---|---|---|",
    ]
    for p in doc["phases"]:
        got = "; ".join(
            f"{k}: " + ", ".join(f"{s} x{n}" for s, n in sorted(c.items())) for k, c in p["abusers"].items()
        )
        each = ", ".join(f"{v:.0f}" for v in p["rounds_ttft_p99_ms"])
        lo, hi = p["p99_ratio_interval"]
        lines.append(
            f"| {p['phase']} | {p['completed']} / {p['failed']} | {p['ttft_p50_ms']:.0f} ms | "
            f"{p['ttft_p99_ms']:.0f} ms ({each}) | {p['ttft_p99_ms'] / base['ttft_p99_ms']:.2f}x ({lo:.2f}-{hi:.2f}) "
            f"| {p['tpot_p50_ms']:.1f} ms | {got or '-'} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase-s", type=float, default=75.0)
    parser.add_argument("--rate", type=float, default=1.5, help="normal requests per second")
    parser.add_argument("--sockets", type=int, default=5000)
    parser.add_argument("--rounds", type=int, default=3, help="times each condition runs, in turn")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "reports" / f"abuse-{date.today()}"))
    args = parser.parse_args()
    port = free_port()
    proc, url = start_server(port, Path(args.out + ".server.log"))
    try:
        asyncio.run(normal_load(url, 10.0, args.rate, 0))  # warm-up
        runs: dict[str, list[tuple[dict, list]]] = {name: [] for name in PHASES}
        for round_ in range(args.rounds):
            for i, name in enumerate(PHASES):
                runs[name].append(run_phase(name, url, port, args, 1 + round_ * len(PHASES) + i))
    finally:
        proc.terminate()
        proc.wait(60)
    base = ttfts([rec for _, records in runs["baseline"] for rec in records])
    phases = [
        pooled(name, [r for r, _ in runs[name]], [rec for _, records in runs[name] for rec in records], base)
        for name in PHASES
    ]
    doc = {
        "machine": machine.describe(),
        "rate": args.rate,
        "phase_s": args.phase_s,
        "rounds": args.rounds,
        "sockets": args.sockets,
        "phases": phases,
    }
    Path(args.out + ".json").write_text(json.dumps(doc, indent=1))
    Path(args.out + ".md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
