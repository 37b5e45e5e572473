"""`tokenfab serve --speculative ngram` over HTTP: the same greedy text as the plain engine, several tokens per
stream chunk, and the speculative decoding metrics on /metrics; `tokenfab generate` and bad options too."""

from __future__ import annotations

import subprocess
import sys

import openai
import pytest

from live_server import LiveServer
from tokenfab import LLM, SamplingParams

REPEAT = " ".join(f"w{i}" for i in (5, 9, 44, 17, 301, 12, 88, 7, 150, 61, 23))
PROMPTS = [" ".join([REPEAT] * 4), "w9 w10 w11 w12 w13 w14", " ".join([REPEAT] * 2) + " w400 w401 w402"]


@pytest.fixture(scope="module")
def model_path(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def server(model_path):
    # Always propose (the adaptive policy, tested on its own, measures step times and may switch off under load).
    live = LiveServer(model_path, "--speculative", "ngram", "--num-speculative-tokens", "3", "--no-spec-adaptive")
    yield live
    assert live.stop() == 0


def test_greedy_text_equals_the_engine_without_speculation(server, model_path):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0)
    resp = client.completions.create(model="tiny", prompt=PROMPTS, max_tokens=40, temperature=0,
                                     extra_body={"ignore_eos": True})
    plain = LLM(str(model_path), num_threads=1, kv_cache_memory_gb=0.05)
    expected = plain.generate(PROMPTS, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
    assert [c.text for c in resp.choices] == [o.outputs[0].text for o in expected]
    assert resp.usage.completion_tokens == 120
    chunks = list(client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True}))
    texts = [c.choices[0].text for c in chunks if c.choices and c.choices[0].text]
    assert "".join(texts) == expected[0].outputs[0].text
    assert len(texts) < 40  # accepted drafts arrive several tokens to a chunk


def test_speculation_metrics_are_exported(server):
    m = server.metrics()
    proposed, accepted = m["tokenfab:spec_proposed_tokens_total"], m["tokenfab:spec_accepted_tokens_total"]
    assert proposed > 0 and 0 < accepted <= proposed
    assert m["tokenfab:spec_verifications_total"] > 0 and m["tokenfab:spec_steps_on_total"] > 0
    assert "tokenfab:spec_steps_off_total" in m
    assert m["tokenfab:spec_mean_acceptance_length"] == pytest.approx(
        1 + accepted / m["tokenfab:spec_verifications_total"])
    assert 0 < m["tokenfab:spec_draft_time_share"] < 1


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "tokenfab.cli", *args], capture_output=True, text=True, timeout=300)


def test_generate_with_speculation_and_bad_options(model_path):
    common = ["--model", str(model_path), "--dtype", "float32", "--max-model-len", "256", "--kv-cache-memory-gb",
              "0.01", "--threads", "1"]
    plain = run_cli("generate", PROMPTS[0], "--max-tokens", "30", *common)
    spec = run_cli("generate", PROMPTS[0], "--max-tokens", "30", "--speculative", "ngram", *common)
    assert plain.returncode == spec.returncode == 0, spec.stderr
    assert spec.stdout == plain.stdout
    assert "ngram drafts:" in spec.stderr and "mean acceptance length" in spec.stderr
    for bad, message in [(["--speculative", "bogus"], "unknown speculative method"),
                         (["--speculative", "draft"], "draft needs a model"),
                         (["--speculative", "mtp"], "no MTP modules"),
                         (["--speculative", "ngram", "--num-speculative-tokens", "0"], "num_speculative_tokens")]:
        proc = run_cli("serve", *common, *bad)
        assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_the_meter_sends_sampling_fields_and_reads_the_spec_counters(server, model_path):
    import asyncio

    import httpx

    from tokenfab.bench.client import stream_completion
    from tokenfab.bench.scrape import scrape

    async def go():
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            record, text = await stream_completion(client, "tiny", PROMPTS[0], 0, 24,
                                                   sampling={"temperature": 0.8, "top_p": 0.9, "seed": 11})
            return record, text, await scrape(client)

    record, text, counters = asyncio.run(go())
    plain = LLM(str(model_path), num_threads=1, kv_cache_memory_gb=0.05)
    params = SamplingParams(max_tokens=24, temperature=0.8, top_p=0.9, seed=11, ignore_eos=True)
    assert text == plain.generate(PROMPTS[0], params)[0].outputs[0].text  # seeded: the same tokens as without drafts
    assert record.output_tokens == 24
    assert counters["tokenfab:spec_proposed_tokens_total"] > 0


def test_the_ladder_has_a_speculation_rung_with_valid_flags():
    from tokenfab.bench.ladder import rungs
    from tokenfab.cli import build_parser
    from tokenfab.config_cli import engine_config

    rung = rungs((1, 4))[-1]
    assert "speculative" in rung.name
    args = build_parser().parse_args(["serve", *rung.flags])
    config = engine_config(args)
    assert config.speculative.method == "ngram" and config.enable_prefix_caching
