"""llama.cpp peer: wraps the llama-bench / llama-batched-bench binaries.

Plain python (standard library only). Binaries come from
``${TOKENFAB_PEERS_DIR:-<repo>/.peers}/llamacpp/build/bin`` (see setup_peers.sh)
or ``--bin-dir``.

  pp512 : llama-bench -p 512 -n 0   (prompt processing of one 512-token prompt)
  tg128 : llama-bench -p 0 -n 128   (batch-1 decode of 128 tokens)
  offline: llama-batched-bench -npl 32 -npp <mean prompt len> -ntg 128
           (32 independent sequences, prompt not shared; tok/s = generated
           tokens / (prefill + decode time))

llama-bench runs its own warm-up and reports the mean over --repetitions;
llama-batched-bench runs a warm-up decode before timing. Peak RSS is the child's
ru_maxrss (getrusage(RUSAGE_CHILDREN)).
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

from common import OFFLINE_MAX_TOKENS, PP_TOKENS, TG_TOKENS, base_parser, emit, load_prompts

REPO = Path(__file__).resolve().parents[2]
PEERS = Path(os.environ.get("TOKENFAB_PEERS_DIR", REPO / ".peers"))


def _run(cmd: list[str]) -> tuple[str, float]:
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{cmd[0]} exited with {proc.returncode}")
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0
    return proc.stdout, round(peak_mb, 1)


def _quant_label(model: str) -> str:
    """Quantization from the GGUF file name (e.g. ...-q4_k_m.gguf -> Q4_K_M)."""
    m = re.search(r"(?i)(?:^|[-_.])((?:i?q\d(?:_[a-z0-9]+)*)|bf16|f16|f32)\.gguf$", os.path.basename(model))
    return (m.group(1).upper() if m else "unknown") + " (GGUF)"


def _sdist_version() -> str | None:
    f = PEERS / "llamacpp" / "VERSION"
    return f.read_text().strip() if f.exists() else None


def _bench(bin_dir: Path, args, n_prompt: int, n_gen: int) -> dict:
    cmd = [str(bin_dir / "llama-bench"), "-m", args.model, "-t", str(args.threads),
           "-p", str(n_prompt), "-n", str(n_gen), "-r", str(args.repetitions), "-o", "json"]
    out, peak = _run(cmd)
    rows = json.loads(out[out.index("["):])
    row = rows[0]
    tokens = n_prompt or n_gen
    seconds = row["avg_ns"] / 1e9
    return {
        "system": "llama.cpp",
        "version": f"{_binary_version(bin_dir)}; llama-cpp-python sdist {_sdist_version()}",
        "workload": args.workload,
        "tokens": tokens,
        "seconds": seconds,
        "tok_per_s": tokens / seconds,
        "peak_rss_mb": peak,
        "quant": _quant_label(args.model),
        "llama_bench_avg_ts": row.get("avg_ts"),
        "notes": (f"llama-bench: mean time of {args.repetitions} reps after warm-up "
                  f"(stddev {row.get('stddev_ts', 0):.2f} tok/s), threads={row.get('n_threads')}, "
                  f"n_batch={row.get('n_batch')}, n_ubatch={row.get('n_ubatch')}, "
                  f"flash_attn={row.get('flash_attn')}, model_type={row.get('model_type')}, "
                  f"cpu={row.get('cpu_info')}"),
    }


def _batched(bin_dir: Path, args) -> dict:
    prompts = load_prompts(args)
    n_seq = len(prompts)
    pp = max(1, round(sum(len(p) for p in prompts) / n_seq))
    tg = args.max_tokens or OFFLINE_MAX_TOKENS
    ctx = n_seq * (pp + tg)
    ctx = (ctx + 255) // 256 * 256
    cmd = [str(bin_dir / "llama-batched-bench"), "-m", args.model, "-t", str(args.threads),
           "-c", str(ctx), "-b", "2048", "-ub", "512",
           "-npp", str(pp), "-ntg", str(tg), "-npl", str(n_seq), "--output-format", "jsonl"]
    out, peak = _run(cmd)
    rows = [json.loads(line) for line in out.splitlines() if line.startswith("{") and "speed_tg" in line]
    if not rows:
        raise SystemExit("llama-batched-bench printed no JSONL result")
    r = rows[-1]
    gen = r["pl"] * r["tg"]
    ver = _binary_version(bin_dir)
    return {
        "system": "llama.cpp",
        "version": f"{ver}; llama-cpp-python sdist {_sdist_version()}",
        "workload": "offline",
        "tokens": gen,
        "seconds": r["t"],
        "tok_per_s": gen / r["t"],
        "peak_rss_mb": peak,
        "quant": _quant_label(args.model),
        "prompt_tokens": r["pl"] * r["pp"],
        "total_tok_per_s": r["speed"],
        "prefill_tok_per_s": r["speed_pp"],
        "decode_tok_per_s": r["speed_tg"],
        "notes": (f"llama-batched-bench: {r['pl']} sequences x (prompt {r['pp']} tokens, uniform = mean "
                  f"prompt length; ids are dummy tokens) + {r['tg']} generated each, prompt not shared; "
                  f"tok_per_s = generated/(t_pp+t_tg); warm-up excluded; n_kv_max={r['n_kv_max']}, "
                  f"flash_attn={r['flash_attn']}, threads={r['n_threads']}"),
    }


def _binary_version(bin_dir: Path) -> str:
    try:
        p = subprocess.run([str(bin_dir / "llama-batched-bench"), "--version"],
                           capture_output=True, text=True, timeout=30)
        for line in (p.stdout + p.stderr).splitlines():
            if line.startswith("version:"):
                return line.split(":", 1)[1].strip()
        return "unknown"
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--bin-dir", default=str(PEERS / "llamacpp" / "build" / "bin"))
    p.add_argument("--repetitions", type=int, default=5, help="llama-bench -r")
    args = p.parse_args()
    if not args.model.endswith(".gguf") or not os.path.isfile(args.model):
        raise SystemExit(f"llama.cpp needs a GGUF file, got {args.model!r}")
    bin_dir = Path(args.bin_dir)
    if not (bin_dir / "llama-bench").exists():
        raise SystemExit(f"llama.cpp binaries not found in {bin_dir}: run benchmarks/peers/setup_peers.sh llamacpp")
    if args.workload == "pp512":
        res = _bench(bin_dir, args, PP_TOKENS, 0)
    elif args.workload == "tg128":
        res = _bench(bin_dir, args, 0, args.max_tokens or TG_TOKENS)
    else:
        res = _batched(bin_dir, args)
    emit(res)


if __name__ == "__main__":
    main()
