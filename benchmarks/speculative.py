"""Speculative decoding on Gemma 3 270M, through each system's OpenAI server: copy-heavy and open-ended traffic
at concurrency 1 and 16, with and without speculation, tokenfab beside llama.cpp's n-gram speculation.

    .venv/bin/python benchmarks/speculative.py     # from the repository root, on a quiet machine

Workloads (deterministic, fresh prompts for every point so no point hits a prefix cached by another):
- copy-heavy, greedy: repeat a paragraph or a function, fix a typo and print the whole function, rewrite a text
  with one word replaced, quote a tool's output back, and agentic turns that quote the tool output of the turn.
- open-ended, sampled (temperature 0.8, top-p 0.95, a seed per request): stories, letters, essays, explanations.

All servers are started at once (an idle one takes no CPU) and every point runs on each system in turn
(A B C D), the whole set repeated with fresh prompts; each figure is the median over repeats. Reported per point: tok/s per user (1 / median TPOT), total output tok/s, mean acceptance length
(1 + accepted drafts per verification, from each server's own counters), $/Mtok output from device time at the
stated price, and for tokenfab also from the usage.cost it reports. Writes speculative.json and speculative.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import httpx

# Measure this checkout's tokenfab, in this process and in the servers it starts, whatever is installed.
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))

from tokenfab import __version__  # noqa: E402
from tokenfab.bench.launch import free_port, launch, server_spec  # noqa: E402
from tokenfab.bench.load import LoadPlan, run_requests  # noqa: E402
from tokenfab.bench.scrape import deltas, scrape  # noqa: E402
from tokenfab.bench.stats import summarize  # noqa: E402
from tokenfab.bench.workloads import RequestSpec  # noqa: E402
from tokenfab.platform import machine  # noqa: E402

SYSTEMS = {
    "tokenfab": ("tokenfab", []),
    "tokenfab+ngram": ("tokenfab", ["--speculative", "ngram"]),
    "llama.cpp": ("llama.cpp", []),
    # n-gram lookup over the request's history, like ours: 3-token key, up to 8 drafted tokens.
    "llama.cpp+ngram": ("llama.cpp", ["--spec-type", "ngram-simple", "--spec-ngram-simple-size-n", "3",
                                      "--spec-ngram-simple-size-m", "8", "--spec-draft-n-max", "8", "--metrics"]),
}
SAMPLED = {"temperature": 0.8, "top_p": 0.95}

TEAMS = ["committee", "council", "design team", "research group", "board", "editorial staff", "volunteer crew"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday"]
THINGS = ["budget", "schedule", "safety plan", "floor plan", "hiring plan", "maintenance report", "survey results"]
PLACES = ["library", "community centre", "swimming pool", "bus depot", "science museum", "harbour office"]
ACTIONS = ["increase funding for", "postpone work on", "publish a summary of", "hire two people for",
           "open a consultation on", "set aside a room for"]
TOPICS = ["children's books", "evening classes", "the roof repairs", "the new bicycle racks", "local history",
          "the weekend market", "solar panels"]
NAMES = ["Alice", "Bruno", "Chen", "Dana", "Emeka", "Farah", "Gustav", "Hana", "Ivan", "Julia"]


def paragraph(rng: random.Random) -> str:
    t, d, th, pl = rng.choice(TEAMS), rng.choice(DAYS), rng.choice(THINGS), rng.choice(PLACES)
    a, b = rng.sample(NAMES, 2)
    return (f"The {t} met on {d} to review the {th} for the new {pl}. After a long discussion, the members "
            f"agreed to {rng.choice(ACTIONS)} {rng.choice(TOPICS)} and to {rng.choice(ACTIONS)} "
            f"{rng.choice(TOPICS)}. {a} asked for a report by the end of the month, and {b} offered to collect "
            f"{rng.randint(12, 90)} responses from residents before the next meeting. The {th} will be presented "
            f"again on {rng.choice(DAYS)}, when the {t} expects to vote on it.")


def function(rng: random.Random) -> str:
    name = rng.choice(["moving_average", "running_total", "clip_values", "normalize", "count_words", "top_scores"])
    arg, n = rng.choice(["values", "items", "data", "samples"]), rng.choice(["window", "size", "limit", "k"])
    acc = rng.choice(["total", "acc", "running", "summed"])
    return (f"def {name}({arg}, {n}):\n    if {n} <= 0:\n        raise ValueError('{n} must be positive')\n"
            f"    out = []\n    {acc} = 0.0\n    for i, v in enumerate({arg}):\n        {acc} += v\n"
            f"        if i >= {n}:\n            {acc} -= {arg}[i - {n}]\n"
            f"        if i >= {n} - 1:\n            out.append({acc} / {n})\n    return out\n")


def readings(rng: random.Random, rows: int = 10) -> list[str]:
    return [f"station {rng.choice(NAMES).lower()}-{i}: temperature {rng.randint(-5, 35)} C, humidity "
            f"{rng.randint(20, 99)}%, wind {rng.randint(0, 60)} km/h {rng.choice(['N', 'E', 'S', 'W'])}"
            for i in range(rows)]


def copy_prompt(rng: random.Random, kind: int) -> str:
    if kind == 0:
        return f"Repeat the following text exactly.\n\nText: {paragraph(rng)}\n\nRepeated text:"
    if kind == 1:
        return f"Repeat the following code exactly.\n\nCode:\n{function(rng)}\nRepeated code:\n"
    if kind == 2:
        code = function(rng)
        typo = code.replace("return out", "retrun out")
        return f"Fix the typo in this code and print the whole file.\n\nCode:\n{typo}\nFixed code:\n"
    if kind == 3:
        text = paragraph(rng)
        day = next(d for d in DAYS if d in text)
        new = rng.choice([d for d in DAYS if d != day])
        return f"Rewrite the text with '{day}' replaced by '{new}'.\n\nText: {text}\n\nRewritten text:"
    lines = readings(rng)
    if kind == 4:
        return ("Tool output:\n" + "\n".join(lines) + "\n\nAssistant: The tool returned these readings:\n"
                + lines[0].split(":")[0] + ":")
    question = f"What is the weather like at the {rng.choice(PLACES)} stations today?"
    return (f"User: {question}\nAssistant: I will call the weather tool.\nTool (weather) returned:\n"
            + "\n".join(lines) + "\nAssistant: Here is the tool output, quoted in full:\n"
            + lines[0].split(":")[0] + ":")


OPEN = ["Once upon a time, in a small village by the sea, there lived {name}, who",
        "Dear {name},\n\nThank you for your letter. I was delighted to hear that",
        "In this essay, I will argue that cities should invest more in {topic} because",
        "{name} opened the old wooden door of the {place} and saw",
        "Here is how a {place} decides what to do with its {thing}:",
        "The history of the {place} begins in",
        "Write a short story about {name} and the {team} of the {place}.\n\nStory:",
        "Explain to a child why the {team} wants to {action} {topic}.\n\nExplanation:"]


def open_prompt(rng: random.Random) -> str:
    return rng.choice(OPEN).format(name=rng.choice(NAMES), topic=rng.choice(TOPICS), place=rng.choice(PLACES),
                                   thing=rng.choice(THINGS), team=rng.choice(TEAMS), action=rng.choice(ACTIONS))


def workload(name: str, n: int, max_tokens: int, seed: int) -> list[RequestSpec]:
    rng = random.Random(f"{name}-{seed}")
    specs = []
    for i in range(n):
        if name == "copy":
            prompt, sampling = copy_prompt(rng, i % 6), None
        else:
            prompt, sampling = open_prompt(rng), {**SAMPLED, "seed": seed * 1000 + i}
        # prompt_tokens is filled in by the server's usage; the client needs no tokenizer.
        specs.append(RequestSpec(prompt, 0, max_tokens, sampling=sampling))
    return specs


async def run_point(url: str, specs: list[RequestSpec], concurrency: int, timeout: float) -> dict:
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        await run_requests(client, model, specs[:1], LoadPlan(concurrency=1, request_timeout_s=timeout))  # warm-up
        before = await scrape(client)
        start = time.monotonic()
        records = await run_requests(client, model, specs[1:], LoadPlan(concurrency=concurrency,
                                                                        request_timeout_s=timeout))
        wall = time.monotonic() - start
        counters = deltas(before, await scrape(client))
    return {"records": records, "wall_s": wall, "counters": counters or {}}


def acceptance_length(counters: dict) -> float | None:
    """1 + accepted drafts per verification, from tokenfab's or llama.cpp's own counters."""
    for accepted, verified in (("tokenfab:spec_accepted_tokens_total", "tokenfab:spec_verifications_total"),
                               ("llamacpp:spec_decode_num_accepted_tokens_total",
                                "llamacpp:spec_decode_num_drafts_total")):
        if counters.get(verified):
            return 1 + counters[accepted] / counters[verified]
    return None


def point_summary(result: dict, price_per_hour: float) -> dict:
    s = summarize(result["records"], duration=result["wall_s"], price_per_hour=price_per_hour)
    out = s.output_tokens
    return {"completed": s.completed, "failed": sum(s.failed.values()), "output_tokens": out,
            "tok_s_per_user": s.interactivity, "total_tok_s": s.output_tok_s, "ttft_p50_s": s.ttft_s["p50"],
            "acceptance_length": acceptance_length(result["counters"]),
            "usd_per_mtok_device": s.usd_per_mtok_output,
            "usd_per_mtok_reported": s.server_usd * 1e6 / out if s.server_usd is not None and out else None,
            "server_counters": result["counters"]}


def launch_all(systems: list[str], args: argparse.Namespace, max_seqs: int) -> dict:
    """Start every system's server at once; an idle server takes no CPU, so points can alternate between them."""
    servers = {}
    try:
        for name in systems:
            kind, flags = SYSTEMS[name]
            if kind == "tokenfab":
                flags = [*flags, "--kv-cache-memory-gb", str(args.kv_cache_memory_gb)]
            port = free_port()
            spec = server_spec(kind, port, args.peers_dir, args.threads, max_seqs, args.max_model_len, flags)
            servers[name] = launch(spec, port, args.out / "logs")
    except BaseException:
        for server in servers.values():
            server.stop()
        raise
    return servers


def run_points(servers: dict, args: argparse.Namespace, points: list[tuple[str, int]]) -> dict:
    """Every point on every system in turn (A B C D per point), repeated; fresh prompts each time."""
    runs: dict[str, dict[str, list[dict]]] = {name: {} for name in servers}
    for repeat in range(args.repeats):
        for workload_name, concurrency in points:
            n = 1 + (args.requests_c1 if concurrency == 1 else 2 * concurrency)
            for name, server in servers.items():
                seed = repeat * 100 + concurrency  # the same prompts for every system
                result = asyncio.run(run_point(server.url, workload(workload_name, n, args.max_tokens, seed),
                                               concurrency, args.timeout))
                r = point_summary(result, args.price_per_hour)
                runs[name].setdefault(f"{workload_name}@{concurrency}", []).append(r)
                print(f"  [{repeat + 1}/{args.repeats}] {name:16s} {workload_name:5s} c={concurrency:<3d} "
                      f"{r['tok_s_per_user'] or 0:7.1f} tok/s/user {r['total_tok_s'] or 0:7.1f} tok/s  "
                      f"acceptance length {r['acceptance_length'] or 0:.2f}", flush=True)
    return runs


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def combine(runs: list[dict]) -> dict:
    """Median over repeats of every numeric figure of a point."""
    keys = ("tok_s_per_user", "total_tok_s", "ttft_p50_s", "acceptance_length", "usd_per_mtok_device",
            "usd_per_mtok_reported")
    return {**{k: median([r[k] for r in runs]) for k in keys}, "repeats": runs}


def markdown(doc: dict) -> str:
    lines = [f"# Speculative decoding on Gemma 3 270M ({doc['created'][:10]})", "",
             f"Machine: {doc['machine'].get('cpu')}, {doc['machine'].get('cores')} cores; servers with "
             f"{doc['threads']} threads. Price ${doc['price_per_hour']}/device-hour. tokenfab serves the default "
             "model (the Q4_K_M GGUF dequantized, fp32 here); llama.cpp serves the Q4_K_M GGUF itself. "
             f"{doc['max_tokens']} output tokens per request; concurrency 1: {doc['requests_c1']} requests, "
             f"concurrency 16: 32 requests (after one warm-up request each). Medians over {doc['repeats']} repeats; "
             "the systems take turns at every point.", "",
             f"Command: `{doc['command']}`", "",
             "| system | workload | concurrency | tok/s per user | total tok/s | acceptance length | "
             "$/Mtok (device time) | $/Mtok (usage.cost) |", "|---|---|---|---|---|---|---|---|"]
    for system, points in doc["results"].items():
        for point, r in points.items():
            workload_name, concurrency = point.split("@")
            lines.append(f"| {system} | {workload_name} | {concurrency} | {_f(r['tok_s_per_user'])} | "
                         f"{_f(r['total_tok_s'])} | {_f(r['acceptance_length'], 2)} | "
                         f"{_f(r['usd_per_mtok_device'], 3)} | {_f(r['usd_per_mtok_reported'], 3)} |")
    lines += ["", "Speculation on / off, same system (median over repeats of the ratio within a repeat, where the two "
              "ran back to back):", "", "| system | copy c=1 tok/s per user | copy c=16 total tok/s | "
              "open c=1 tok/s per user | open c=16 total tok/s |", "|---|---|---|---|---|"]
    for base in ("tokenfab", "llama.cpp"):
        on, off = doc["results"].get(f"{base}+ngram"), doc["results"].get(base)
        if on and off:
            lines.append(f"| {base} | {_x(on, off, 'copy@1', 'tok_s_per_user')} | "
                         f"{_x(on, off, 'copy@16', 'total_tok_s')} | {_x(on, off, 'open@1', 'tok_s_per_user')} | "
                         f"{_x(on, off, 'open@16', 'total_tok_s')} |")
    lines += ["", "Targets: >= 2x tok/s per user at concurrency 1 on the copy-heavy workload; >= 0.95x total tok/s "
              "at concurrency 16 on the open-ended one."]
    return "\n".join(lines) + "\n"


def _f(v, digits: int = 1) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _x(on: dict, off: dict, point: str, key: str) -> str:
    pairs = zip(on.get(point, {}).get("repeats", []), off.get(point, {}).get("repeats", []))
    ratios = [a[key] / b[key] for a, b in pairs if a[key] and b[key]]
    if not ratios:
        return "-"
    return f"{statistics.median(ratios):.2f}x ({', '.join(f'{r:.2f}' for r in ratios)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--systems", default=",".join(SYSTEMS))
    p.add_argument("--workloads", default="copy,open")
    p.add_argument("--concurrency", default="1,16")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--requests-c1", type=int, default=4, help="measured requests at concurrency 1")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--kv-cache-memory-gb", type=float, default=1.0, help="per tokenfab server")
    p.add_argument("--price-per-hour", type=float, default=0.09, help="device $/h (default: 2 cores x $0.045)")
    p.add_argument("--peers-dir", type=Path,
                   default=Path(os.environ.get("TOKENFAB_PEERS_DIR", Path(__file__).resolve().parent.parent / ".peers")),
                   help="where benchmarks/peers/setup_peers.sh installed the peers (default: .peers in the repository)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--out", type=Path, default=Path("benchmarks/reports/speculative"))
    p.add_argument("--render", type=Path, default=None, help="only rewrite the Markdown of this JSON")
    args = p.parse_args()
    if args.render:
        args.render.with_suffix(".md").write_text(markdown(json.loads(args.render.read_text())))
        return
    systems = [s for s in args.systems.split(",") if s]
    points = [(w, int(c)) for w in args.workloads.split(",") for c in args.concurrency.split(",")]
    args.out.mkdir(parents=True, exist_ok=True)
    servers = launch_all(systems, args, max(c for _, c in points))
    try:
        runs = run_points(servers, args, points)
    finally:
        for server in servers.values():
            server.stop()
    results = {s: {p: combine(r) for p, r in runs[s].items()} for s in systems}
    doc = {"kind": "tokenfab-speculative-benchmark", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
           "tokenfab_version": __version__, "machine": machine.describe(), "threads": args.threads,
           "price_per_hour": args.price_per_hour, "max_tokens": args.max_tokens, "requests_c1": args.requests_c1,
           "repeats": args.repeats, "systems": {s: SYSTEMS[s][1] for s in systems},
           "command": "python " + " ".join(sys.argv),
           "results": results}
    (args.out / "speculative.json").write_text(json.dumps(doc, indent=1, default=str))
    (args.out / "speculative.md").write_text(markdown(doc))
    print(markdown(doc))


if __name__ == "__main__":
    main()
