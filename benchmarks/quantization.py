"""Quantization benchmark on Gemma 3 270M: per weight format, and llama.cpp's Q4_K_M beside them — weight bytes
per token, peak RSS, batch-1 decode tok/s, offline throughput, perplexity and KL vs the bf16 model.

    .venv/bin/python benchmarks/quantization.py [--formats none,fp8,int8,int4,nvfp4,gguf] [--rounds 1]
        [--tg-tokens 128] [--offline-prompts 32] [--offline-tokens 128] [--out benchmarks/reports/quantization]

Speed: each system runs in its own process per workload (benchmarks/tokenfab_runner.py, and
benchmarks/peers/llamacpp_runner.py with llama-bench / llama-batched-bench), rounds alternating systems; medians.
Accuracy: tokenfab.evaluation on the shipped corpus, every variant and llama.cpp scoring the same token ids in
lockstep against the bf16 reference (weights rounded to bf16, fp32 arithmetic). llama.cpp's log-probabilities
come from its own library (the llama-cpp-python sdist's ctypes bindings over the libllama built in
$TOKENFAB_PEERS_DIR/llamacpp, see benchmarks/peers/setup_peers.sh).

Note: the default model is distributed as Q4_K_M; its "bf16" weights are that GGUF dequantized, so llama.cpp's
row measures its arithmetic (activations quantized to 8 bits in its dot products), not a weight requantization.
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
import types
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's tokenfab, whichever checkout the environment was installed from
PEERS = Path(os.environ.get("TOKENFAB_PEERS_DIR", REPO / ".peers"))
LLAMACPP = "llama.cpp Q4_K_M"


def speed_runs(systems: dict[str, list[str]], args) -> dict[str, dict[str, list[dict]]]:
    runs: dict[str, dict[str, list[dict]]] = {s: {} for s in systems}
    workloads = {"tg": ["--workload", "tg128", "--max-tokens", str(args.tg_tokens)],
                 "offline": ["--workload", "offline", "--num-prompts", str(args.offline_prompts),
                             "--max-tokens", str(args.offline_tokens)]}
    for r in range(args.rounds):
        for workload, extra in workloads.items():
            for name, cmd in systems.items():
                result = run_json(cmd + extra + ["--threads", str(args.threads)], args.timeout)
                runs[name].setdefault(workload, []).append(result)
                print(f"round {r + 1} {workload:8s} {name:12s} {result.get('tok_per_s', result.get('error'))}",
                      flush=True)
    return runs


def run_json(cmd: list[str], timeout: int) -> dict:
    env = {**os.environ, "TOKENFAB_PEERS_DIR": str(PEERS),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO, env=env)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"error": f"exit {proc.returncode}: {proc.stderr.strip()[-300:]}"}
    return json.loads(lines[-1])


def systems(formats: list[str], hf_dir: Path, gguf: Path) -> dict[str, list[str]]:
    runner = [sys.executable, str(REPO / "benchmarks" / "tokenfab_runner.py"), "--model"]
    # gguf keeps the file's own blocks, so it loads the GGUF; every other format quantizes the fp32 copy of it.
    out = {f: runner + [str(gguf if f == "gguf" else hf_dir), "--quantization", f] for f in formats}
    if (PEERS / "llamacpp" / "build" / "bin" / "llama-bench").exists():
        out[LLAMACPP] = [sys.executable, str(REPO / "benchmarks" / "peers" / "llamacpp_runner.py"),
                         "--model", str(gguf)]
    return out


class LlamaCppScorer:
    """llama.cpp's next-token log-probabilities for the evaluation windows (same token ids as tokenfab)."""

    def __init__(self, gguf: Path, window: int, threads: int) -> None:
        sdist = next((PEERS / "llamacpp" / "src").glob("llama_cpp_python-*"))
        os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(PEERS / "llamacpp" / "build" / "bin"))
        sys.path.insert(0, str(sdist))
        # llama_cpp imports diskcache for an optional prompt cache that is not used here.
        sys.modules.setdefault("diskcache", types.SimpleNamespace(Cache=object))
        import llama_cpp

        self.llm = llama_cpp.Llama(str(gguf), n_ctx=window, n_batch=window, n_ubatch=window, n_threads=threads,
                                   logits_all=True, verbose=False)
        self.version = f"llama-cpp-python {llama_cpp.__version__}"
        self._n = 0

    def prepare(self, ids: list[int]) -> None:
        self.llm.reset()
        self.llm.eval(ids)
        self._n = len(ids)

    def logprobs(self, rows: slice) -> torch.Tensor:
        scores = torch.from_numpy(np.array(self.llm.scores[rows], dtype=np.float32))
        return torch.log_softmax(scores, dim=-1)


def accuracy(formats: list[str], gguf: Path, args) -> dict:
    from tokenfab.evaluation.runner import evaluate, parse_variant

    variants = [parse_variant(f) for f in formats + args.accuracy_only if f != "none"]
    others = {}
    try:
        others[LLAMACPP] = LlamaCppScorer(gguf, args.window, args.threads)
    except (StopIteration, ImportError, OSError, ValueError) as e:
        print(f"llama.cpp accuracy skipped: {e}", file=sys.stderr)
    result = evaluate(None, variants, args.window, args.max_eval_tokens, None, others=others)
    if LLAMACPP in others:
        result["llamacpp_version"] = others[LLAMACPP].version
    return result


def gguf_weight_bytes(gguf: Path) -> int:
    """Bytes of all tensors: the tied LM head reads the whole token embedding for every token."""
    import gguf as gguf_lib

    return int(sum(t.n_bytes for t in gguf_lib.GGUFReader(gguf).tensors))


def summarize(runs: dict, acc: dict, gguf: Path) -> list[dict]:
    by_variant = {r["variant"]: r for r in acc["rows"]}
    rows = []
    for name, per in runs.items():
        ok = {w: [r for r in rs if "tok_per_s" in r] for w, rs in per.items()}
        sample = next((r for rs in ok.values() for r in rs), {})
        a = by_variant.get("bf16 (reference)" if name == "none" else name, {})
        rows.append({
            "system": "llama.cpp" if name == LLAMACPP else "tokenfab",
            "format": name if name != "none" else "none (model dtype)",
            "plan": "Q4_K_M (GGUF)" if name == LLAMACPP else sample.get("quantization") or a.get("plan"),
            "weight_bytes": gguf_weight_bytes(gguf) if name == LLAMACPP else
            sample.get("weight_bytes", a.get("weight_bytes")),
            "peak_rss_mb": max((r.get("peak_rss_mb", 0) for rs in ok.values() for r in rs), default=None),
            "decode_tok_s": _median(ok.get("tg", [])), "offline_tok_s": _median(ok.get("offline", [])),
            "errors": [r["error"] for rs in per.values() for r in rs if "error" in r],
            **{k: a.get(k) for k in ("perplexity", "ppl_delta_pct", "kl_mean", "kl_p99", "greedy_agreement")},
        })
    return rows


def _median(results: list[dict]) -> float | None:
    return round(statistics.median(r["tok_per_s"] for r in results), 2) if results else None


def markdown(report: dict) -> str:
    a, m = report["accuracy"], report["machine"]
    lines = [f"# Quantization — Gemma 3 270M, {m['cpu']} ({m['cores']} cores), {report['time'][:10]}", "",
             f"Speed: medians of {report['rounds']} round(s); batch-1 decode = BOS + {report['tg_tokens']} tokens; "
             f"offline = {report['offline_prompts']} prompts x {report['offline_tokens']} tokens (ignore_eos). "
             f"Accuracy: {a['scored_tokens']} tokens of the shipped corpus in windows of {a['window']}; reference = "
             f"{a['reference']}; KL(reference || system) per next token.", "",
             "| system | format | weight MB/token | peak RSS MB | decode tok/s (batch 1) | offline tok/s | perplexity "
             "| Δ ppl vs bf16 | KL mean | greedy agreement |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['system']} | {r['plan'] or r['format']} | {_f(r['weight_bytes'], 1e-6, 1)} | "
                     f"{_f(r['peak_rss_mb'])} | {_f(r['decode_tok_s'])} | {_f(r['offline_tok_s'])} | "
                     f"{_f(r['perplexity'], 1, 3)} | {_f(r['ppl_delta_pct'], 1, 2)} % | {_f(r['kl_mean'], 1, 4)} | "
                     f"{_f(r['greedy_agreement'], 100, 1)} % |")
    lines += ["", "On this CPU (AVX2, no VNNI): int8 and the 4-bit formats (int4, nvfp4) run W8A8/W4A8 integer kernels, "
              "fp8 widens its weights to fp32 in registers, gguf runs the file's own blocks with int8 activations "
              "(tokenfab/kernels/csrc/). The gguf row's weights are the file's exactly, so its deltas are activation "
              "rounding alone; the other tokenfab formats requantize those (already 4-5 bit) weights.", ""]
    return "\n".join(lines)


def _f(v, scale: float = 1, digits: int = 1) -> str:
    return "-" if v is None else f"{v * scale:.{digits}f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--formats", default="none,fp8,int8,int4,nvfp4,gguf")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--tg-tokens", type=int, default=128)
    ap.add_argument("--offline-prompts", type=int, default=32)
    ap.add_argument("--offline-tokens", type=int, default=128)
    ap.add_argument("--accuracy-only", default="int4/gptq,nvfp4/gptq",
                    help="further eval variants (tokenfab eval syntax) measured for accuracy only")
    ap.add_argument("--window", type=int, default=512)
    ap.add_argument("--max-eval-tokens", type=int, default=None)
    ap.add_argument("--timeout", type=int, default=3600)
    ap.add_argument("--skip-speed", action="store_true", help="accuracy only")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "reports" / "quantization"))
    args = ap.parse_args()
    from tokenfab.loader.default_model import default_model_dir, default_model_path
    from tokenfab.platform.machine import cpu_name

    torch.set_num_threads(args.threads)
    gguf, hf_dir = default_model_path(), default_model_dir()
    formats = [f for f in args.formats.split(",") if f]
    args.accuracy_only = [f for f in args.accuracy_only.split(",") if f]
    runs = {} if args.skip_speed else speed_runs(systems(formats, hf_dir, gguf), args)
    acc = accuracy(formats, gguf, args)
    report = {"schema": 1, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "rounds": args.rounds,
              "tg_tokens": args.tg_tokens, "offline_prompts": args.offline_prompts,
              "offline_tokens": args.offline_tokens,
              "machine": {"cpu": cpu_name(), "cores": os.cpu_count(), "python": platform.python_version(),
                          "torch": torch.__version__},
              "model": {"gguf": str(gguf), "hf_dir": str(hf_dir)}, "accuracy": acc, "raw": runs}
    report["rows"] = summarize({**(runs or {f: {} for f in formats + [LLAMACPP]}),
                                **{f: {} for f in args.accuracy_only}}, acc, gguf)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quantization.json").write_text(json.dumps(report, indent=1))
    (out / "quantization.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
