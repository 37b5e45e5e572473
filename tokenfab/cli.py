"""Command line: `tokenfab serve`, `generate`, `convert`, `quantize`, `eval` and `bench`."""

from __future__ import annotations

import argparse
import sys
import time

from pathlib import Path

from tokenfab.config import EngineConfig, PricingConfig, SpeculativeConfig

_DEFAULTS = {name: f.default for name, f in EngineConfig.__dataclass_fields__.items()}


def _engine_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="HF directory or .gguf file (default: embedded Gemma 3 270M)")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--max-model-len", type=int, default=_DEFAULTS["max_model_len"])
    p.add_argument("--kv-cache-memory-gb", type=float, default=_DEFAULTS["kv_cache_memory_gb"])
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--batch-invariant", action=argparse.BooleanOptionalAction, default=_DEFAULTS["batch_invariant"],
                   help="tokens never depend on the batch (tokenfab's CPU kernels at every batch size); "
                        "--no-batch-invariant lets a CPU with native bf16 run torch's bf16 matmuls")
    d = {name: f.default for name, f in SpeculativeConfig.__dataclass_fields__.items()}
    p.add_argument("--speculative", default="none", metavar="none|ngram|mtp|draft:MODEL",
                   help="speculative decoding: n-gram prompt lookup, the checkpoint's MTP modules, or a draft model "
                        "with the same tokenizer (HF directory or .gguf)")
    p.add_argument("--num-speculative-tokens", type=int, default=d["num_speculative_tokens"],
                   help="most draft tokens per request and step")
    p.add_argument("--spec-ngram-min", type=int, default=d["ngram_min"], help="shortest suffix n-gram looked up")
    p.add_argument("--spec-ngram-max", type=int, default=d["ngram_max"], help="longest suffix n-gram looked up")
    p.add_argument("--spec-adaptive", action=argparse.BooleanOptionalAction, default=d["adaptive"],
                   help="pick 0..K drafts per request and step from measured acceptance and step cost")
    _quantization_args(p)


def _quantization_args(p: argparse.ArgumentParser) -> None:
    from tokenfab.quant import WEIGHT_FORMATS

    p.add_argument("--quantization", default="none", choices=list(WEIGHT_FORMATS),
                   help="weight format of the linear layers, quantized at load from the float weights; gguf keeps "
                        "a .gguf model's own quantized blocks (the default model's GGUF when --model is left out)")
    p.add_argument("--quantization-exclude", action="append", default=None, metavar="GLOB",
                   help="layer names kept unquantized, e.g. lm_head or 'layers.0.*' (repeatable; default: the "
                        "format's measured defaults, see tokenfab.quant.plan)")
    p.add_argument("--quantization-override", action="append", default=[], metavar="GLOB=FORMAT",
                   help="another format for matching layers, e.g. lm_head=int8 (repeatable)")
    p.add_argument("--quantization-method", default="rtn", choices=["rtn", "gptq"],
                   help="rtn: round to nearest; gptq: error-compensated codes on shipped calibration text "
                        "(int4 and nvfp4 layers; slower to load)")


def _quantization_options(args: argparse.Namespace) -> dict:
    exclude = tuple(args.quantization_exclude) if args.quantization_exclude is not None else None
    return dict(quantization=args.quantization, quantization_exclude=exclude,
                quantization_overrides=tuple(args.quantization_override),
                quantization_method=args.quantization_method)


def _speculative(args: argparse.Namespace) -> SpeculativeConfig:
    return SpeculativeConfig.parse(args.speculative, num_speculative_tokens=args.num_speculative_tokens,
                                   ngram_min=args.spec_ngram_min, ngram_max=args.spec_ngram_max,
                                   adaptive=args.spec_adaptive)


def _serve_args(p: argparse.ArgumentParser) -> None:
    from tokenfab.serve.settings import ServerSettings

    d = {name: f.default for name, f in ServerSettings.__dataclass_fields__.items()}
    p.add_argument("--host", default=d["host"])
    p.add_argument("--port", type=int, default=d["port"])
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: from the model)")
    p.add_argument("--max-num-seqs", type=int, default=_DEFAULTS["max_num_seqs"])
    p.add_argument("--max-num-batched-tokens", type=int, default=_DEFAULTS["max_num_batched_tokens"])
    p.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction,
                   default=_DEFAULTS["enable_prefix_caching"], help="reuse KV blocks of shared prompt prefixes")
    p.add_argument("--max-queued-requests", type=int, default=d["max_queued_requests"],
                   help="waiting requests admitted beyond the running ones; more get 429")
    p.add_argument("--max-queued-tokens", type=int, default=d["max_queued_tokens"])
    p.add_argument("--request-timeout", type=float, default=d["request_timeout"])
    p.add_argument("--graceful-shutdown-timeout", type=float, default=d["graceful_shutdown_timeout"])
    p.add_argument("--device-profile", default=None, help="price catalogue profile: cpu, h100, h200, a100, l4")
    p.add_argument("--usd-per-hour", type=float, default=None, help="device price (per core for cpu)")
    p.add_argument("--usd-per-kwh", type=float, default=None, help="electricity price")
    p.add_argument("--idle-watts", type=float, default=None)
    p.add_argument("--peak-watts", type=float, default=None)
    p.add_argument("--prices-file", default=None, help="TOML/JSON with profile, prices and watts")
    p.add_argument("--request-log", default=None, help="JSONL file: one line per request with user, tokens, cost")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _serve(args: argparse.Namespace) -> int:
    from tokenfab.serve.server import serve
    from tokenfab.serve.settings import ServerSettings

    pricing = PricingConfig(args.device_profile, args.usd_per_hour, args.usd_per_kwh, args.idle_watts,
                            args.peak_watts, args.prices_file)
    engine = EngineConfig(model=args.model, dtype=args.dtype, batch_invariant=args.batch_invariant,
                          max_model_len=args.max_model_len,
                          kv_cache_memory_gb=args.kv_cache_memory_gb, num_threads=args.threads,
                          max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
                          enable_prefix_caching=args.enable_prefix_caching, pricing=pricing,
                          speculative=_speculative(args), **_quantization_options(args))
    name = args.served_model_name or (Path(args.model).name.removesuffix(".gguf") if args.model else "gemma-3-270m")
    settings = ServerSettings(args.host, args.port, name, args.max_queued_requests, args.max_queued_tokens,
                              args.request_timeout, args.graceful_shutdown_timeout, args.request_log)
    return serve(engine, settings, args.log_level)


def _generate(args: argparse.Namespace) -> int:
    from tokenfab import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, batch_invariant=args.batch_invariant, max_model_len=args.max_model_len,
              kv_cache_memory_gb=args.kv_cache_memory_gb, num_threads=args.threads, speculative=_speculative(args),
              **_quantization_options(args))
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
    stats = llm.engine.core.stats()
    spec = ""
    if stats.spec_verified_seqs:
        spec = (f", {stats.spec_method} drafts: {stats.spec_accepted_tokens}/{stats.spec_proposed_tokens} accepted, "
                f"mean acceptance length {1 + stats.spec_accepted_tokens / stats.spec_verified_seqs:.2f}")
    print(f"[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tok/s, finish: {final.outputs[0].finish_reason}{spec}]",
          file=sys.stderr)
    return 0


def _convert(args: argparse.Namespace) -> int:
    from tokenfab.loader.convert import convert_gguf_to_hf

    out = convert_gguf_to_hf(args.gguf, args.out_dir, dtype=args.dtype)
    print(out)
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from tokenfab.quant.export import quantize_checkpoint

    exclude = tuple(args.quantization_exclude) if args.quantization_exclude is not None else None
    out = quantize_checkpoint(None if args.model == "default" else args.model, args.out_dir, args.format,
                              exclude, tuple(args.quantization_override), args.dtype)
    print(out)
    return 0


def _add_quantize(sub) -> None:
    from tokenfab.quant import QUANTIZED_FORMATS

    q = sub.add_parser("quantize", help="write a quantized HF checkpoint (NVFP4 in NVIDIA ModelOpt's layout)")
    q.add_argument("model", help="HF directory or .gguf file, or 'default' for the embedded Gemma 3 270M")
    q.add_argument("out_dir")
    q.add_argument("--format", required=True, choices=list(QUANTIZED_FORMATS))
    q.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"],
                   help="dtype of the float tensors, and of the weights before quantization")
    q.add_argument("--quantization-exclude", action="append", default=None, metavar="GLOB",
                   help="layer names kept in float (repeatable; default: lm_head)")
    q.add_argument("--quantization-override", action="append", default=[], metavar="GLOB=FORMAT",
                   help="another format for matching layers (written in tokenfab's layout)")
    q.set_defaults(func=_quantize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenfab", description="LLM inference built around cost per token")
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (default: Gemma 3 270M on port 8000)")
    _engine_args(srv)
    _serve_args(srv)
    srv.set_defaults(func=_serve)
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
    from tokenfab.economics.bench.cli import add_parser as add_bench

    add_bench(sub)
    conv = sub.add_parser("convert", help="write an HF safetensors directory from a GGUF file")
    conv.add_argument("gguf")
    conv.add_argument("out_dir")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    conv.set_defaults(func=_convert)
    _add_quantize(sub)
    from tokenfab.evaluation.cli import add_parser as add_eval

    add_eval(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        print(f"tokenfab: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
