import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))

from tiny_models import write_tiny_model  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    """kind -> path of a random-weight HF checkpoint, written once per session."""
    made: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in made:
            made[kind] = write_tiny_model(kind, tmp_path_factory.mktemp(kind))
        return made[kind]

    return get


@pytest.fixture(scope="session")
def hf_model():
    """kind-or-path -> transformers model in fp32 (cached per session)."""
    import transformers

    cache = {}

    def get(path: Path):
        if path not in cache:
            cache[path] = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        return cache[path]

    return get


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    """transformers' greedy continuation with its own KV cache; EOS is an ordinary token (like ignore_eos)."""
    out: list[int] = []
    with torch.no_grad():
        step = model(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            out.append(int(step.logits[0, -1].argmax()))
            step = model(torch.tensor([[out[-1]]]), past_key_values=step.past_key_values, use_cache=True)
    return out


def random_prompts(lengths, seed=0, vocab=512):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(4, vocab, (n,), generator=g).tolist() for n in lengths]
