"""Command line: `tokenfab serve`, `generate`, `convert`, `quantize`, `eval` and `bench`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from tokenfab.config_cli import add_engine_args, add_fields, engine_config, field_values


def _serve_args(p: argparse.ArgumentParser) -> None:
    from tokenfab.serve.settings import ServerSettings

    add_engine_args(p)
    add_fields(p, ServerSettings, skip={"served_model_name"})
    p.add_argument("--served-model-name", default=None, help="model id clients send (default: from the model)")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])


def _serve(args: argparse.Namespace) -> int:
    from tokenfab.serve.server import serve
    from tokenfab.serve.settings import ServerSettings

    engine = engine_config(args)
    name = args.served_model_name or (Path(engine.model).name.removesuffix(".gguf") if engine.model else "gemma-3-270m")
    settings = ServerSettings(served_model_name=name, **field_values(args, ServerSettings))
    return serve(engine, settings, args.log_level)


def _core(args: argparse.Namespace) -> int:
    from tokenfab.engine.client import CoreAddresses
    from tokenfab.engine.core_process import run_core

    addresses = CoreAddresses.parse(args.connect)
    run_core(engine_config(args), addresses.to_core, addresses.from_core, watch_parent=False)
    return 0


def _kv_events(args: argparse.Namespace) -> int:
    """Follow a server's KV events: one JSON line per event, gaps recovered through the replay socket."""
    import json

    import msgspec

    from tokenfab.engine.kv_events import KVEventSubscriber

    sub = KVEventSubscriber(args.connect, args.replay, args.topic)
    first = args.replay is not None
    try:
        while True:
            for seq, batch in sub.batches(timeout_ms=1000, catch_up=first):
                for event in batch.events:
                    record = {"seq": seq, "ts": batch.ts, "type": type(event).__name__, **msgspec.to_builtins(event)}
                    print(json.dumps(record), flush=True)
                if args.count is not None and sub.last_seq + 1 >= args.count:
                    print(json.dumps({"cached_blocks": len(sub.blocks)}), flush=True)
                    return 0
            first = False
    except KeyboardInterrupt:
        return 0
    finally:
        sub.close()


def _generate(args: argparse.Namespace) -> int:
    from tokenfab import SamplingParams
    from tokenfab.engine.types import RequestOutput
    from tokenfab.llm import LLM

    llm = LLM.from_config(engine_config(args))
    params = SamplingParams(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        stop=args.stop or [],
    )
    prompt = args.prompt
    if args.chat:
        prompt = llm.tokenizer.encode_chat([{"role": "user", "content": args.prompt}])
    start = time.perf_counter()
    shown = 0
    final: RequestOutput | None = None
    for out in llm.stream(prompt, params):
        text = out.outputs[0].text
        sys.stdout.write(text[shown:])
        sys.stdout.flush()
        shown = len(text)
        final = out
    elapsed = time.perf_counter() - start
    assert final is not None, "a stream ends with a finished output"
    n = len(final.outputs[0].token_ids)
    sys.stdout.write("\n")
    stats = llm.engine.stats()
    spec = ""
    if stats.spec.verified_seqs:
        spec = (
            f", {stats.spec.method} drafts: {stats.spec.accepted_tokens}/{stats.spec.proposed_tokens} accepted, "
            f"mean acceptance length {1 + stats.spec.accepted_tokens / stats.spec.verified_seqs:.2f}"
        )
    print(
        f"[{n} tokens in {elapsed:.2f} s, {n / elapsed:.1f} tok/s, finish: {final.outputs[0].finish_reason}{spec}]",
        file=sys.stderr,
    )
    return 0


def _convert(args: argparse.Namespace) -> int:
    from tokenfab.loader.convert import convert_gguf_to_hf

    out = convert_gguf_to_hf(args.gguf, args.out_dir, dtype=args.dtype)
    print(out)
    return 0


def _quantize(args: argparse.Namespace) -> int:
    from tokenfab.quantize.export import quantize_checkpoint

    exclude = tuple(args.quantization_exclude) if args.quantization_exclude is not None else None
    out = quantize_checkpoint(
        None if args.model == "default" else args.model,
        args.out_dir,
        args.format,
        exclude,
        tuple(args.quantization_override),
        args.dtype,
    )
    print(out)
    return 0


def _add_quantize(sub) -> None:
    from tokenfab.quant import QUANTIZED_FORMATS

    q = sub.add_parser("quantize", help="write a quantized HF checkpoint (NVFP4 in NVIDIA ModelOpt's layout)")
    q.add_argument("model", help="HF directory or .gguf file, or 'default' for the embedded Gemma 3 270M")
    q.add_argument("out_dir")
    q.add_argument("--format", required=True, choices=list(QUANTIZED_FORMATS))
    q.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float32", "float16"],
        help="dtype of the float tensors, and of the weights before quantization",
    )
    q.add_argument(
        "--quantization-exclude",
        action="append",
        default=None,
        metavar="GLOB",
        help="layer names kept in float (repeatable; default: lm_head)",
    )
    q.add_argument(
        "--quantization-override",
        action="append",
        default=[],
        metavar="GLOB=FORMAT",
        help="another format for matching layers (written in tokenfab's layout)",
    )
    q.set_defaults(func=_quantize)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenfab", description="LLM inference built around cost per token")
    sub = parser.add_subparsers(dest="command", required=True)
    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (default: Gemma 3 270M on port 8000)")
    _serve_args(srv)
    srv.set_defaults(func=_serve)
    core = sub.add_parser("core", help="an engine core that connects to a server started with --external-core")
    core.add_argument(
        "--connect", required=True, metavar="tcp://HOST:PORT", help="the server's --engine-transport address"
    )
    add_engine_args(core)
    core.set_defaults(func=_core)
    kv = sub.add_parser("kv-events", help="print a server's KV cache events (one JSON line per event)")
    kv.add_argument("--connect", default="tcp://127.0.0.1:5557", help="the server's --kv-events-endpoint")
    kv.add_argument("--replay", default=None, help="the server's --kv-events-replay-endpoint (recovers gaps)")
    kv.add_argument("--topic", default="kv-events")
    kv.add_argument("--count", type=int, default=None, help="stop after this many batches")
    kv.set_defaults(func=_kv_events)
    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to stdout")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=64)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--stop", action="append", help="stop string (repeatable)")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    add_engine_args(gen)
    gen.set_defaults(func=_generate)
    from tokenfab.bench.cli import add_parser as add_bench

    add_bench(sub)
    conv = sub.add_parser("convert", help="write an HF safetensors directory from a GGUF file")
    conv.add_argument("gguf")
    conv.add_argument("out_dir")
    conv.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    conv.set_defaults(func=_convert)
    _add_quantize(sub)
    from tokenfab.evaluation.cli import add_parser as add_eval
    from tokenfab.sim.cli import add_parsers as add_sim

    add_eval(sub)
    add_sim(sub)
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
