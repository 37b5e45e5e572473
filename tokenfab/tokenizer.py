"""Tokenizer: a `tokenizers.Tokenizer` plus special tokens and the chat template, from an HF directory or a GGUF."""

from __future__ import annotations

import json
import re
import secrets
from collections import defaultdict
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers.decoders import DecodeStream


@dataclass(frozen=True)
class SpecialTokens:
    bos_token_id: int | None
    eos_token_ids: tuple[int, ...]
    pad_token_id: int | None
    add_bos_token: bool
    chat_template: str | None


class Tokenizer:
    def __init__(self, inner: tokenizers.Tokenizer, special: SpecialTokens) -> None:
        self.inner = inner
        self.special = special
        self._template = _compile(special.chat_template) if special.chat_template else None

    @property
    def vocab_size(self) -> int:
        return self.inner.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.special.eos_token_ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = _encode(self.inner, text)
        bos = self.special.bos_token_id
        if add_special_tokens and self.special.add_bos_token and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def decode_stream(self, skip_special_tokens: bool = True) -> DecodeStream:
        return DecodeStream(skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        if self._template is None:
            raise ValueError("this model has no chat template")
        tok = self.inner
        bos = self.special.bos_token_id
        eos = self.special.eos_token_ids[0] if self.special.eos_token_ids else None
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools,
            bos_token=tok.id_to_token(bos) if bos is not None else "",
            eos_token=tok.id_to_token(eos) if eos is not None else "",
        )

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> list[int]:
        return self.render_chat(messages, add_generation_prompt)[1]

    def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tools: list[dict[str, Any]] | None = None,
    ) -> tuple[str, list[int]]:
        """The conversation through the chat template, as text and token ids. Only the template's own markup
        becomes control tokens: a message that types one (`<end_of_turn>` in a user turn, to forge a turn) has
        its content tokenized as plain text. The rendered template already carries BOS where the model wants it.
        """
        text = self.apply_chat_template(messages, add_generation_prompt, tools)
        if not any(self._specials.spans(str(m.get("content") or "")) for m in messages):
            return text, self.encode(text, add_special_tokens=False)
        # Render again with a marker in place of each content, then tokenize the template's pieces with control
        # tokens and the contents without. (The contents go in as sent, so a template's `trim` is not applied.)
        tag = secrets.token_hex(8)
        marked = [{**m, "content": f"\ue000{tag}:{i}\ue001"} for i, m in enumerate(messages)]
        pieces = re.split(f"\ue000{tag}:(\\d+)\ue001", self.apply_chat_template(marked, add_generation_prompt, tools))
        ids: list[int] = []
        for k, piece in enumerate(pieces):
            if k % 2:
                ids += self.encode_plain(str(messages[int(piece)].get("content") or ""))
            elif piece:
                ids += _encode(self.inner, piece)
        return text, ids

    def encode_plain(self, text: str) -> list[int]:
        """Token ids of `text` with any control-token text in it spelled as ordinary tokens (no BOS)."""
        ids: list[int] = []
        at = 0
        for start, end in self._specials.spans(text):
            if at < start:
                ids += _encode(self.inner, text[at:start])
            # Its first character alone, then the rest, so the pieces cannot match the control token again.
            ids += _encode(self.inner, text[start]) + self.encode_plain(text[start + 1 : end])
            at = end
        if at < len(text):
            ids += _encode(self.inner, text[at:])
        return ids

    @cached_property
    def max_token_chars(self) -> int:
        """The longest token's text: a text longer than this times N characters has more than N tokens."""
        return max(len(t) for t in self.inner.get_vocab(with_added_tokens=True))

    @cached_property
    def _specials(self) -> _Occurrences:
        added = self.inner.get_added_tokens_decoder().values()
        return _Occurrences([t.content for t in added if t.special and t.content])

    def warm(self) -> None:
        """Build the tables the first request would otherwise wait for."""
        _ = self.max_token_chars, self._specials


LONG_TEXT = 4096
"""Characters above which encoding goes through `encode_batch`, which releases the GIL (`encode` holds it): a
long prompt tokenized on a worker thread then leaves the server's event loop running."""


def _encode(inner: tokenizers.Tokenizer, text: str) -> list[int]:
    if len(text) > LONG_TEXT:
        return inner.encode_batch([text], add_special_tokens=False)[0].ids
    return inner.encode(text, add_special_tokens=False).ids


class _Occurrences:
    """Where a text contains any of a set of strings (leftmost, longest first, not overlapping). Each occurrence of
    a first character is checked against the strings that begin with the same two characters (control tokens are
    a few thousand short strings; `<unused17>` and `<div>` part at the second)."""

    def __init__(self, strings: list[str]) -> None:
        self._strings = set(strings)
        self._firsts = {s[0] for s in self._strings}
        self._lengths: dict[str, list[int]] = defaultdict(list)
        for s in self._strings:
            self._lengths[s[:2]].append(len(s))
        for lengths in self._lengths.values():
            lengths.sort(reverse=True)

    def spans(self, text: str) -> list[tuple[int, int]]:
        starts = sorted(at for first in self._firsts for at in _positions(text, first))
        found: list[tuple[int, int]] = []
        for at in starts:
            if found and at < found[-1][1]:
                continue
            lengths = self._lengths.get(text[at : at + 2], []) + self._lengths.get(text[at], [])
            n = next((n for n in lengths if text[at : at + n] in self._strings), 0)
            if n:
                found.append((at, at + n))
        return found


def _positions(text: str, char: str) -> list[int]:
    out, at = [], text.find(char)
    while at != -1:
        out.append(at)
        at = text.find(char, at + 1)
    return out


def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value: Any, indent: int | None = None, separators=None, sort_keys: bool = False) -> str:
        # As Hugging Face renders templates: plain JSON (jinja's own tojson HTML-escapes '<', '>' and '&').
        return json.dumps(value, ensure_ascii=False, indent=indent, separators=separators, sort_keys=sort_keys)

    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.filters["tojson"] = tojson
    return env.from_string(source)


def _token_id(inner: tokenizers.Tokenizer, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, dict):
        value = value.get("content")
    return inner.token_to_id(value) if isinstance(value, str) else int(value)


def load_hf_tokenizer(directory: Path) -> Tokenizer:
    inner = tokenizers.Tokenizer.from_file(str(directory / "tokenizer.json"))
    cfg = _read_json(directory / "tokenizer_config.json")
    gen = _read_json(directory / "generation_config.json")
    model_cfg = _read_json(directory / "config.json")
    eos = gen.get("eos_token_id", model_cfg.get("eos_token_id"))
    if eos is None:
        eos = _token_id(inner, cfg.get("eos_token"))
    eos_ids = tuple([eos] if isinstance(eos, int) else (eos or []))
    bos = _token_id(inner, cfg.get("bos_token")) if cfg.get("bos_token") else model_cfg.get("bos_token_id")
    template = cfg.get("chat_template")
    jinja = directory / "chat_template.jinja"
    if template is None and jinja.exists():
        template = jinja.read_text()
    # tokenizer.json's post-processor may add BOS itself; encode() adds it only when it is missing.
    add_bos = bool(cfg.get("add_bos_token", bos is not None and _post_processor_adds(inner, bos)))
    special = SpecialTokens(bos, eos_ids, _token_id(inner, cfg.get("pad_token")), add_bos, template)
    return Tokenizer(inner, special)


def _post_processor_adds(inner: tokenizers.Tokenizer, bos: int) -> bool:
    return bos in inner.encode("a", add_special_tokens=True).ids


def load_gguf_tokenizer(path: Path, model_type: str) -> Tokenizer:
    from tokenfab.loader.chat_templates import default_chat_template
    from tokenfab.loader.gguf_tokenizer import read_gguf_tokenizer

    inner, info = read_gguf_tokenizer(path)
    eos = info.get("eos_token_id")
    eos_ids = tuple([eos] if isinstance(eos, int) else (eos or []))
    template = info.get("chat_template") or default_chat_template(model_type)
    special = SpecialTokens(
        info.get("bos_token_id"), eos_ids, info.get("pad_token_id"), bool(info.get("add_bos_token", False)), template
    )
    return Tokenizer(inner, special)


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def token_windows(tokenizer: Tokenizer, text: str, window: int, max_tokens: int | None = None) -> list[list[int]]:
    """Non-overlapping windows of at most `window` tokens, each starting with BOS (when the model has one)
    followed by the next stretch of the text; every token after the first is scored."""
    body = tokenizer.encode(text, add_special_tokens=False)
    if max_tokens is not None:
        body = body[:max_tokens]
    bos = tokenizer.special.bos_token_id
    prefix = [bos] if bos is not None else []
    step = window - len(prefix)
    if step < 1:
        raise ValueError(f"window {window} is too short")
    chunks = [prefix + body[i : i + step] for i in range(0, len(body), step)]
    return [c for c in chunks if len(c) >= 2]
