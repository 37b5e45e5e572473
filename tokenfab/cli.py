"""Command line: `tokenfab generate` and `tokenfab convert`."""

from __future__ import annotations

import argparse
import sys
import time

from tokenfab.config import EngineConfig

_DEFAULTS = {name: f.default for name, f in EngineConfig.__dataclass_fields__.items()}


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded Gemma 3 270M)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=_DEFAULTS["max_model_len"])
    p.add_argument("--kv-cache-memory-gb", type=float, default=_DEFAULTS["kv_cache_memory_gb"])
    p.add_argument("--threads", type=int, default=None)


def _generate(args: argparse.Namespace) -> int:
    from tokenfab import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, max_model_len=args.max_model_len,
              kv_cache_memory_gb=args.kv_cache_memory_gb, num_threads=args.threads)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop or [])
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    start = time.perf_counter()
    shown = 0
    final = None
    for out in llm.stream(prompt, params):
        text = out.outputs[0].text
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        shown = len(text)
        final = out
    elapsed = time.perf_counter() - start
    n = len(final.outputs[0].token_ids) if final else 0
    sys.stdout.write("\n")
    print(f"[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tok/s, finish: {final.outputs[0].finish_reason}]",
          file=sys.stderr)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from tokenfab.loader.convert import convert_gguf_to_hf

    out = convert_gguf_to_hf(args.gguf, args.out_dir, dtype=args.dtype)
    print(out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenfab", description="LLM inference built around cost per token")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--seed", type=int, default=None)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    _engine_args(gen)
    gen.set_defaults(func=_generate)
    conv = sub.add_parser("convert", help="write an HF safetensors directory from a GGUF file")
    conv.add_argument("gguf")
    conv.add_argument("out_dir")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    conv.set_defaults(func=_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"tokenfab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
