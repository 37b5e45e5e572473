"""Shared helpers for the peer runners (standard library only).

Each runner is executed with its peer's own interpreter (``.peers/<peer>/bin/python``
or plain python for llama.cpp), so this module must not import anything outside
the standard library. Running ``python benchmarks/peers/<x>_runner.py`` puts this
directory on ``sys.path``, which is how the runners find it.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
import threading
import time

WORKLOADS = ("offline", "tg128", "pp512")

# Offline workload defaults: 32 prompts x 128 generated tokens, ignore_eos.
OFFLINE_NUM_PROMPTS = 32
OFFLINE_MAX_TOKENS = 128
OFFLINE_MIN_LEN = 16
OFFLINE_MAX_LEN = 64
TG_TOKENS = 128
PP_TOKENS = 512

# Gemma 3 BOS id; ordinary vocabulary ids well clear of the special/control
# tokens at the low end and the multimodal tokens at the high end.
GEMMA_BOS = 2
SAFE_ID_LO = 1000
SAFE_ID_HI = 200000


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--workload", choices=WORKLOADS, required=True)
    p.add_argument("--model", required=True, help="HF model directory or GGUF file")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts-file", default=None,
                   help="JSON list of token-id lists (offline workload); "
                        "generated from --seed when omitted")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-prompts", type=int, default=OFFLINE_NUM_PROMPTS)
    p.add_argument("--max-tokens", type=int, default=None,
                   help="generated tokens per sequence (default: 128 for offline/tg128, 1 for pp512)")
    return p


def synth_prompts(n: int, seed: int, min_len: int = OFFLINE_MIN_LEN,
                  max_len: int = OFFLINE_MAX_LEN) -> list[list[int]]:
    """Deterministic prompts: BOS followed by ordinary-vocabulary ids."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        out.append([GEMMA_BOS] + [rng.randrange(SAFE_ID_LO, SAFE_ID_HI) for _ in range(length - 1)])
    return out


def fixed_prompt(length: int, seed: int) -> list[int]:
    rng = random.Random(seed + 1_000_003)
    return [GEMMA_BOS] + [rng.randrange(SAFE_ID_LO, SAFE_ID_HI) for _ in range(length - 1)]


def load_prompts(args) -> list[list[int]]:
    if args.prompts_file:
        with open(args.prompts_file) as f:
            prompts = json.load(f)
        if not (isinstance(prompts, list) and all(isinstance(p, list) and p for p in prompts)):
            raise SystemExit(f"{args.prompts_file}: expected a JSON list of non-empty token-id lists")
        return [[int(t) for t in p] for p in prompts]
    return synth_prompts(args.num_prompts, args.seed)


def _proc_mem_kb(pid: int, field: str) -> int:
    """A kB field of /proc/PID/smaps_rollup (Pss) or /proc/PID/status (VmRSS)."""
    path = f"/proc/{pid}/smaps_rollup" if field == "Pss:" else f"/proc/{pid}/status"
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _descendants(pid: int) -> list[int]:
    out, stack = [], [pid]
    while stack:
        p = stack.pop()
        try:
            tasks = os.listdir(f"/proc/{p}/task")
        except OSError:
            continue
        for t in tasks:
            try:
                with open(f"/proc/{p}/task/{t}/children") as f:
                    kids = [int(x) for x in f.read().split()]
            except OSError:
                continue
            out.extend(kids)
            stack.extend(kids)
    return out


class RssSampler:
    """Peak memory of this process and all its descendants, sampled in a thread.

    Engines that run their core in child processes (vLLM V1: engine core + worker)
    would be under-reported by getrusage(RUSAGE_SELF), and summing plain RSS counts
    pages shared between the processes (torch's libraries, mmapped weights) once per
    process. So the sum of PSS (proportional set size) is used when there are
    children; for a single process it equals its RSS up to shared-library pages.
    """

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.peak_kb = 0
        self.max_procs = 1
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = os.getpid()
        kids = _descendants(me)
        if kids:
            total = sum(_proc_mem_kb(p, "Pss:") for p in [me] + kids)
        else:
            total = _proc_mem_kb(me, "VmRSS:")
        self.max_procs = max(self.max_procs, 1 + len(kids))
        self.peak_kb = max(self.peak_kb, total)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def start(self) -> RssSampler:
        self._t.start()
        return self

    def stop(self) -> float:
        self._stop.set()
        self._t.join()
        self._sample()
        return self.peak_mb()

    def peak_mb(self) -> float:
        # The largest single process's ru_maxrss is a floor (kB on Linux).
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        return round(max(self.peak_kb, own, kids) / 1024.0, 1)

    def describe(self) -> str:
        if self.max_procs > 1:
            return f"peak_rss_mb = peak sum of PSS over {self.max_procs} processes (runner + children)"
        return "peak_rss_mb = peak RSS of the runner process"


_RESULT_OUT = None


def claim_stdout() -> None:
    """Point fd 1 at stderr (for this process and every child it starts) and keep
    the real stdout for the result line, so engine logs that are printed to stdout,
    even at interpreter exit, cannot land after the JSON."""
    global _RESULT_OUT
    if _RESULT_OUT is None:
        sys.stdout.flush()
        _RESULT_OUT = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)


def emit(result: dict) -> None:
    """Print the result as ONE JSON object on stdout's last line."""
    if result.get("seconds") and result.get("tokens") is not None and "tok_per_s" not in result:
        result["tok_per_s"] = result["tokens"] / result["seconds"]
    for k in ("seconds", "tok_per_s"):
        if isinstance(result.get(k), float):
            result[k] = round(result[k], 4)
    sys.stdout.flush()
    sys.stderr.flush()
    print(json.dumps(result), file=_RESULT_OUT or sys.stdout, flush=True)


def now() -> float:
    return time.perf_counter()
