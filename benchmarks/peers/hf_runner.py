"""Hugging Face transformers peer: eager PyTorch ``generate`` on CPU.

Run with the hf peer's interpreter (``.peers/hf/bin/python``).

  tg128  : one BOS-only prompt, 128 greedy tokens (min_new_tokens=128, so EOS is ignored)
  pp512  : one 512-token prompt, max_new_tokens=1
  offline: all prompts in one left-padded batch, 128 greedy tokens each; capped by
           --max-seconds (generate(max_time=...)): if the cap hits, tokens counts only
           what was generated and notes say so.

Warm-up (a short call of the same shape) is excluded from timing. Default dtype is
float32 (bfloat16 has no hardware support on AVX2-only CPUs and is much slower).
"""

from __future__ import annotations

import os
import sys

from common import (GEMMA_BOS, OFFLINE_MAX_TOKENS, PP_TOKENS, TG_TOKENS, RssSampler, base_parser, claim_stdout, emit,
                    fixed_prompt, load_prompts, now)


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--max-seconds", type=float, default=300.0,
                   help="cap on the timed offline generate call")
    p.add_argument("--attn", default="sdpa", help="attn_implementation")
    args = p.parse_args()

    claim_stdout()
    rss = RssSampler().start()
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    kw = dict(dtype=dtype, attn_implementation=args.attn)
    if args.model.endswith(".gguf"):
        kw["gguf_file"] = os.path.basename(args.model)
        src = os.path.dirname(os.path.abspath(args.model))
        try:  # dense weights in --dtype, not transformers' packed-GGUF kernels
            from transformers import GgufConfig
            kw["quantization_config"] = GgufConfig(dequantize=True)
        except ImportError:  # older transformers always dequantize GGUF
            pass
    else:
        src = args.model
    try:
        model = AutoModelForCausalLM.from_pretrained(src, **kw)
    except TypeError:  # older transformers spell it torch_dtype
        kw["torch_dtype"] = kw.pop("dtype")
        model = AutoModelForCausalLM.from_pretrained(src, **kw)
    model.eval()
    pad_id = model.config.pad_token_id
    if pad_id is None:
        pad_id = 0
    gen_common = dict(do_sample=False, pad_token_id=pad_id)
    notes = []

    def gen(ids, mask, n, **extra):
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n,
                                  min_new_tokens=n, **gen_common, **extra)

    if args.workload == "tg128":
        n = args.max_tokens or TG_TOKENS
        ids = torch.tensor([[GEMMA_BOS]])
        mask = torch.ones_like(ids)
        gen(ids, mask, 8)  # warm-up
        t0 = now()
        out = gen(ids, mask, n)
        seconds = now() - t0
        tokens = out.shape[1] - ids.shape[1]
        notes.append("prompt = BOS only; time includes the 1-token prefill")
    elif args.workload == "pp512":
        ids = torch.tensor([fixed_prompt(PP_TOKENS, args.seed)])
        mask = torch.ones_like(ids)
        gen(ids, mask, 1)  # warm-up, same shape
        t0 = now()
        gen(ids, mask, args.max_tokens or 1)
        seconds = now() - t0
        tokens = PP_TOKENS
        notes.append("one 512-token prompt, generate(max_new_tokens=1); tok/s = 512 / wall time")
    else:
        prompts = load_prompts(args)
        n = args.max_tokens or OFFLINE_MAX_TOKENS
        width = max(len(q) for q in prompts)
        ids = torch.tensor([[pad_id] * (width - len(q)) + q for q in prompts])
        mask = torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in prompts])
        gen(ids, mask, 4)  # warm-up, full batch
        t0 = now()
        out = gen(ids, mask, n, max_time=args.max_seconds)
        seconds = now() - t0
        steps = out.shape[1] - width
        tokens = steps * len(prompts)
        notes.append(f"{len(prompts)} prompts (len {min(map(len, prompts))}-{width}) in one left-padded "
                     f"batch, greedy, min_new_tokens=max_new_tokens={n}")
        if steps < n:
            notes.append(f"TRUNCATED by --max-seconds={args.max_seconds:g}: {steps}/{n} steps done")

    peak = rss.stop()
    notes.append(rss.describe())
    emit({
        "system": "hf-transformers",
        "version": f"transformers {transformers.__version__}, torch {torch.__version__}",
        "workload": args.workload,
        "tokens": int(tokens),
        "seconds": seconds,
        "tok_per_s": tokens / seconds,
        "peak_rss_mb": peak,
        "dtype": args.dtype,
        "notes": "; ".join(notes + [f"attn={args.attn}, threads={torch.get_num_threads()}",
                                    "weights from GGUF (dequantized)" if "gguf_file" in kw else "weights from HF dir"]),
    })


if __name__ == "__main__":
    sys.exit(main())
