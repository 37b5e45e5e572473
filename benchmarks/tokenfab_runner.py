"""tokenfab in the peers' runner interface (same workloads, same prompts, one JSON line on stdout).

Run with the project's interpreter: `.venv/bin/python benchmarks/tokenfab_runner.py --workload offline --model M`.
Besides tok/s it reports what the step reads and computes, so offline.py can state achieved GB/s and GFLOP/s.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent / "peers"))

from common import (  # noqa: E402
    GEMMA_BOS,
    OFFLINE_MAX_TOKENS,
    PP_TOKENS,
    TG_TOKENS,
    RssSampler,
    base_parser,
    emit,
    fixed_prompt,
    load_prompts,
    now,
)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", default="auto")
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=512)
    p.add_argument("--quantization", default="none", help="weight format of the linear layers")
    p.add_argument("--quantization-exclude", action="append", default=None)
    p.add_argument("--quantization-override", action="append", default=[])
    p.add_argument("--no-batch-invariant", action="store_true",
                   help="let a CPU with native bf16 run torch's bf16 matmuls (EngineConfig.batch_invariant=False)")
    args = p.parse_args()
    rss = RssSampler().start()
    import torch

    import tokenfab
    from tokenfab import LLM, SamplingParams
    from tokenfab.kernels.build import kernel_path

    llm = LLM(args.model, dtype=args.dtype, num_threads=args.threads, max_model_len=2048,
              max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
              enable_prefix_caching=False, quantization=args.quantization, batch_invariant=not args.no_batch_invariant,
              quantization_exclude=args.quantization_exclude, quantization_overrides=args.quantization_override)

    def run(prompts: list[list[int]], n: int) -> int:
        outs = llm.generate(prompts, SamplingParams(max_tokens=n, temperature=0, ignore_eos=True))
        return sum(len(o.outputs[0].token_ids) for o in outs)

    if args.workload == "tg128":
        n = args.max_tokens or TG_TOKENS
        run([[GEMMA_BOS]], 8)
        t0 = now()
        tokens = run([[GEMMA_BOS]], n)
        seconds = now() - t0
        note = "prompt = BOS only; time includes the 1-token prefill"
    elif args.workload == "pp512":
        prompt = fixed_prompt(PP_TOKENS, args.seed)
        run([prompt], 1)
        t0 = now()
        run([prompt], args.max_tokens or 1)
        seconds = now() - t0
        tokens = PP_TOKENS
        note = "one 512-token prompt, max_tokens=1; tok/s = 512 / wall time"
    else:
        prompts = load_prompts(args)
        n = args.max_tokens or OFFLINE_MAX_TOKENS
        run(prompts, 4)
        t0 = now()
        tokens = run(prompts, n)
        seconds = now() - t0
        note = f"{len(prompts)} prompts x {n} tokens, ignore_eos, greedy; tok/s = generated / wall time"
    engine = llm.engine.core
    _, plan = engine.config.resolve_weights()
    weights = plan.label if plan is not None and plan.label != "none" else str(engine.dtype).replace("torch.", "")
    emit({
        "system": "tokenfab", "version": tokenfab.__version__, "workload": args.workload, "tokens": tokens,
        "seconds": seconds, "peak_rss_mb": rss.stop(), "dtype": str(engine.dtype).replace("torch.", ""),
        "torch": torch.__version__, "threads": args.threads, "notes": note,
        "weight_bytes": engine.model.weight_bytes_per_token(), "flops_per_token": engine.arch.flops_per_token(),
        "lm_head_flops_per_token": 2 * engine.arch.vocab_size * engine.arch.hidden_size,
        "steps": engine.stats().scheduler.steps, "quantization": engine.quantization_label, "weights": weights,
        "batch_invariant": engine.config.batch_invariant, **kernel_path().as_dict(),
    })


if __name__ == "__main__":
    main()
