"""Soak: mixed, partly abusive traffic against one `tokenfab serve` for a long run; memory must stay flat, KV blocks
come back, and the server's counters must agree with what the clients saw.

    .venv/bin/python benchmarks/soak.py --minutes 30      # from the repository root (not part of CI)

Traffic, all at once: normal completions and chats (streamed and whole), streams the client drops after a few
tokens, bursts of 40 requests past the admission queue (429s), bodies over the size limit (413), invalid requests
(400), and 500 idle or half-sent sockets reopened as the server closes them. Every 30 s the resident memory of the
front end and of the engine core is sampled. At the end (after the traffic stops): RSS growth of each process from
the end of warm-up (the first fifth of the run) to the end, KV blocks in use, requests running, and the
server's counters beside the clients' tallies. Writes soak-<date>.json and .md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections import Counter
from datetime import date
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

from tokenfab.bench.launch import free_port  # noqa: E402
from tokenfab.platform import machine  # noqa: E402

WORDS = ["river", "stone", "lantern", "harbor", "meadow", "copper", "violet", "engine", "signal", "garden"]
SERVER_ARGS = ["--max-queued-requests", "16", "--max-body-mb", "1", "--header-timeout", "10"]


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def core_pid(pid: int) -> int:
    """The engine core: the server's largest child (multiprocessing's resource tracker is a child too)."""
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return max((int(c) for c in f.read().split()), key=rss_mb)


def metrics(url: str) -> dict[str, float]:
    """name{labels} -> value, and the bare name -> the first series' value."""
    values: dict[str, float] = {}
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
            values.setdefault(name.split("{")[0], float(value))
    return values


def prompt(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


class Tally:
    def __init__(self) -> None:
        self.statuses: Counter[str] = Counter()
        self.finished: Counter[str] = Counter()
        self.dropped = 0

    def saw(self, kind: str, status: int | str) -> None:
        self.statuses[f"{kind} {status}"] += 1


async def normal(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    stream = rng.random() < 0.5
    if rng.random() < 0.5:
        path, body = "/v1/completions", {"prompt": prompt(rng, rng.randint(10, 200))}
    else:
        path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": prompt(rng, 50)}]}
    body.update(max_tokens=rng.randint(4, 64), temperature=rng.choice([0.0, 0.8]), stream=stream)
    if not stream:
        r = await client.post(path, json=body)
        tally.saw("normal", r.status_code)
        if r.status_code == 200:
            tally.finished.update(c["finish_reason"] for c in r.json()["choices"])
        return
    async with client.stream("POST", path, json=body) as r:
        tally.saw("normal", r.status_code)
        async for line in r.aiter_lines():
            if line.startswith("data: {"):
                for c in json.loads(line[6:]).get("choices", []):
                    if c.get("finish_reason"):
                        tally.finished[c["finish_reason"]] += 1


async def dropped(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    body = {"prompt": prompt(rng, 100), "max_tokens": 400, "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as r:
        tally.saw("dropped", r.status_code)
        if r.status_code != 200:
            return
        chunks = 0
        async for _ in r.aiter_lines():
            chunks += 1
            if chunks > 10:
                tally.dropped += 1
                return  # leaving the block closes the connection mid-stream


async def burst(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    async def one() -> None:
        r = await client.post("/v1/completions", json={"prompt": prompt(rng, 20), "max_tokens": 32})
        tally.saw("burst", r.status_code)
        if r.status_code == 200:
            tally.finished.update(c["finish_reason"] for c in r.json()["choices"])

    await asyncio.gather(*(one() for _ in range(40)))


async def oversized(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    r = await client.post("/v1/completions", json={"prompt": "x" * (2 * 2**20)})
    tally.saw("oversized", r.status_code)


async def invalid(client: httpx.AsyncClient, rng: random.Random, tally: Tally) -> None:
    r = await client.post("/v1/completions", json={"prompt": "hi", "max_tokens": -1})
    tally.saw("invalid", r.status_code)


async def idle_sockets(port: int, n: int, stop: asyncio.Event, tally: Tally) -> None:
    async def hold(i: int) -> None:
        while not stop.is_set():
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                tally.saw("idle", "connect_failed")
                await asyncio.sleep(1.0)
                continue
            if i % 2:
                writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-")
            try:
                await asyncio.wait_for(reader.read(), timeout=60)
            except (OSError, TimeoutError):
                pass
            writer.close()
            tally.saw("idle", "closed")
            await asyncio.sleep(1.0)

    await asyncio.gather(*(hold(i) for i in range(n)))


async def traffic(url: str, port: int, seconds: float, tally: Tally, seed: int) -> None:
    rng = random.Random(seed)
    stop = asyncio.Event()
    kinds = [(normal, 2.0), (dropped, 0.3), (oversized, 0.1), (invalid, 0.2)]
    limits = httpx.Limits(max_connections=200)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        sockets = asyncio.create_task(idle_sockets(port, 500, stop, tally))
        tasks: set[asyncio.Task] = set()
        end, next_burst = time.monotonic() + seconds, time.monotonic() + 20
        while time.monotonic() < end:
            kind = rng.choices([k for k, _ in kinds], weights=[w for _, w in kinds])[0]
            if time.monotonic() >= next_burst:
                kind, next_burst = burst, time.monotonic() + 60
            task = asyncio.create_task(_guarded(kind(client, rng, tally), tally))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            await asyncio.sleep(rng.expovariate(sum(w for _, w in kinds)))
        await asyncio.gather(*tasks)
        stop.set()
        sockets.cancel()
        await asyncio.gather(sockets, return_exceptions=True)


async def _guarded(work, tally: Tally) -> None:
    try:
        await work
    except httpx.HTTPError as e:
        tally.saw("client_error", type(e).__name__)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "reports" / f"soak-{date.today()}"))
    args = parser.parse_args()
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = Path(args.out + ".server.log")
    proc = subprocess.Popen(
        [sys.executable, "-m", "tokenfab.cli", "serve", "--port", str(port), *SERVER_ARGS],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 600
        while not _healthy(url):
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"the server did not start; see {log}")
            time.sleep(0.5)
        core = core_pid(proc.pid)
        tally, samples = Tally(), []
        seconds = args.minutes * 60

        async def sample() -> None:
            start = time.monotonic()
            while time.monotonic() - start < seconds:
                samples.append((time.monotonic() - start, rss_mb(proc.pid), rss_mb(core)))
                Path(args.out + ".rss.json").write_text(json.dumps(samples))  # kept if the run is cut short
                await asyncio.sleep(30)

        async def run() -> None:
            sampler = asyncio.create_task(sample())
            await traffic(url, port, seconds, tally, seed=1)
            await sampler

        asyncio.run(run())
        time.sleep(3)
        samples.append((seconds, rss_mb(proc.pid), rss_mb(core)))
        m = metrics(url)
    finally:
        proc.terminate()
        proc.wait(120)
    warm = next(s for s in samples if s[0] >= seconds / 5)
    doc = {
        "machine": machine.describe(),
        "minutes": args.minutes,
        "server_args": SERVER_ARGS,
        "rss_mb": samples,
        "front_end_growth": samples[-1][1] / warm[1] - 1,
        "core_growth": samples[-1][2] / warm[2] - 1,
        "kv_blocks_in_use": m["tokenfab:kv_cache_total_blocks"] - m["tokenfab:kv_cache_free_blocks"],
        "requests_running": m["tokenfab:num_requests_running"] + m["tokenfab:num_requests_waiting"],
        "client": {
            "statuses": dict(tally.statuses),
            "finish_reasons": dict(tally.finished),
            "dropped_streams": tally.dropped,
        },
        "server": {
            k: v for k, v in m.items() if "request_success" in k or "request_rejected" in k or "connections_closed" in k
        },
        "server_exit": proc.returncode,
    }
    doc["agreement"] = agreement(doc["client"], doc["server"])
    Path(args.out + ".json").write_text(json.dumps(doc, indent=1))
    Path(args.out + ".md").write_text(markdown(doc))
    print(markdown(doc))


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def agreement(client: dict, server: dict) -> list[tuple[str, float, float]]:
    """(what, the clients' count, the server's counter) pairs that must be equal."""

    def counter(name: str, label: str) -> float:
        return sum(v for k, v in server.items() if k.startswith(name) and label in k)

    def seen(status: str) -> float:
        return sum(v for k, v in client["statuses"].items() if k.endswith(f" {status}"))

    rows = [
        (
            f"finished {r}",
            client["finish_reasons"].get(r, 0),
            counter("tokenfab:request_success_total", f'finished_reason="{r}"'),
        )
        for r in ("length", "stop")
    ]
    rows.append(
        (
            "dropped streams = aborts",
            client["dropped_streams"],
            counter("tokenfab:request_success_total", 'finished_reason="abort"'),
        )
    )
    rows += [
        (f"status {code}", seen(code), counter("tokenfab:request_rejected_total", f'status="{code}"'))
        for code in ("400", "413", "429")
    ]
    return rows


def markdown(doc: dict) -> str:
    c, s = doc["client"], doc["server"]
    lines = [
        "# Soak",
        "",
        f"{doc['machine']['cpu']} ({doc['machine']['cores']} cores); `tokenfab serve {' '.join(doc['server_args'])}` "
        f"(Gemma 3 270M) for {doc['minutes']:g} min of mixed traffic. Command: "
        f"`.venv/bin/python benchmarks/soak.py --minutes {doc['minutes']:g}`.",
        "",
        f"- RSS from the end of warm-up to the end: front end {doc['front_end_growth']:+.1%}, engine core "
        f"{doc['core_growth']:+.1%} (samples every 30 s in the JSON)",
        f"- after the traffic: {doc['kv_blocks_in_use']:.0f} KV blocks in use, {doc['requests_running']:.0f} requests "
        f"running or waiting; server exit status {doc['server_exit']}",
        f"- dropped streams: {c['dropped_streams']}",
        "",
        "| clients' count vs server counter | clients | server |",
        "|---|---|---|",
        *[f"| {what} | {a:g} | {b:g} |" for what, a, b in doc["agreement"]],
        "",
        "| what the clients saw | count |",
        "|---|---|",
        *[f"| {k} | {v} |" for k, v in sorted(c["statuses"].items())],
        *[f"| finish_reason {k} | {v} |" for k, v in sorted(c["finish_reasons"].items())],
        "",
        "| server counter | value |",
        "|---|---|",
        *[f"| `{k}` | {v:g} |" for k, v in sorted(s.items()) if "{" in k and "_created" not in k],
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
