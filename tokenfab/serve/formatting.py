"""Engine outputs -> OpenAI JSON pieces: usage with cost, and logprobs in the completions and chat shapes."""

from __future__ import annotations

from tokenfab.engine.types import RequestOutput, TokenLogprobs
from tokenfab.tokenizer import Tokenizer


def usage(outputs: list[RequestOutput], energy_source: str, generated: bool = True) -> dict:
    """Usage of one API request (several prompts and n completions each), with its summed cost; `generated`
    False when the request only scored its prompts (no completion tokens are returned or counted)."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs) if generated else 0
    cached = sum(o.num_cached_tokens for o in outputs)
    usd = joules = seconds = 0.0
    for o in outputs:
        if o.cost is not None:
            usd, joules, seconds = usd + o.cost.usd, joules + o.cost.joules, seconds + o.cost.device_seconds
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cached},
        "cost": {"usd": usd, "joules": joules, "device_seconds": seconds, "energy_source": energy_source},
    }


class TokenText:
    """Token id -> its text, cached (logprobs name every token they report)."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._cache) < 65536:
                self._cache[token_id] = text
        return text


def completion_logprobs(entries: list[TokenLogprobs], text: TokenText, offset: int) -> dict:
    tokens, values, tops, offsets = [], [], [], []
    for e in entries:
        token = text(e.token_id)
        tokens.append(token)
        values.append(e.logprob)
        tops.append({text(t): lp for t, lp in e.top} if e.top else {token: e.logprob})
        offsets.append(offset)
        offset += len(token)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def echoed_logprobs(prompt_ids: list[int], entries: list[TokenLogprobs], text: TokenText) -> dict:
    """The prompt's part of an echoed completion's logprobs: every prompt token, the first without a logprob (it
    has no context), the others scored as the prefill computed them."""
    rest = completion_logprobs(entries, text, len(text(prompt_ids[0])))
    first = text(prompt_ids[0])
    return {
        "tokens": [first, *rest["tokens"]],
        "token_logprobs": [None, *rest["token_logprobs"]],
        "top_logprobs": [None, *rest["top_logprobs"]],
        "text_offset": [0, *rest["text_offset"]],
    }


def joined_logprobs(head: dict, tail: dict | None) -> dict:
    """Two completions-shaped logprobs, one after the other."""
    return head if tail is None else {key: head[key] + tail[key] for key in head}


def chat_logprobs(entries: list[TokenLogprobs], text: TokenText) -> dict:
    content = []
    for e in entries:
        token = text(e.token_id)
        top = [{"token": text(t), "logprob": lp, "bytes": list(text(t).encode())} for t, lp in e.top]
        content.append({"token": token, "logprob": e.logprob, "bytes": list(token.encode()), "top_logprobs": top})
    return {"content": content}
