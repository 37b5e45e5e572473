"""MTP proposer: the checkpoint's multi-token-prediction modules (DeepSeek-V3 style) draft from the target's hidden
states.

Module j (0-based) at position p combines the hidden state h^j_p — the target's final hidden state for j = 0,
module j-1's output otherwise — with the embedding of token p + j + 1:
    h^{j+1}_p = Block_j(eh_proj_j([enorm_j(embed(t_{p+j+1})); hnorm_j(h^j_p)]))
and predicts token p + j + 2 through the target's LM head after its own norm (embedding and head are shared
with the target, as in DeepSeek-V3). Each module is a full decoder layer with its own KV cache, stored beside the
target's in the same block ids (the full-attention group's), so it needs no allocator of its own.

Every step each module catches up over the positions whose inputs are now known, in lockstep with the target:
module j has valid KV up to position c - j - 1 after a step that leaves c tokens computed. To propose, module j
also runs on its last j positions with the drafts of modules 0..j-1 as input tokens and emits draft j from
position c - 1; that tail's KV is rewritten with the real tokens next step. So a checkpoint with N modules
proposes up to N tokens. Positions served from the prefix cache keep the MTP KV written there by the request
that computed them, whose following tokens may differ: that can only lower acceptance.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn

from tokenfab.attention.backend import (
    AttentionBackend,
    ForwardContext,
    KVCache,
    KVGroupSpec,
    SeqLayout,
    forward_context,
)
from tokenfab.config import EngineConfig
from tokenfab.engine.kv_cache_manager import KVCacheManager
from tokenfab.engine.speculative.proposer import Proposal, Proposer, StepView
from tokenfab.engine.types import Request
from tokenfab.models.arch import ArchConfig
from tokenfab.models.decoder import DecoderLayer, DecoderModel, layer_index, load_hf_weights
from tokenfab.models.layers import Linear, RMSNorm
from tokenfab.models.loading import iter_weights
from tokenfab.quant import build_weight

_SHARED = ("embed_tokens.weight", "shared_head.head.weight")
"""Per-module copies of the target's embedding and head in DeepSeek-V3 checkpoints; the target's are used."""


class _SharedHead(nn.Module):
    """The checkpoint's `shared_head` (its norm; the head itself is the target's LM head)."""

    def __init__(self, norm: RMSNorm) -> None:
        super().__init__()
        self.norm = norm


class MTPLayer(DecoderLayer):
    def __init__(self, arch: ArchConfig, layer: int) -> None:
        super().__init__(arch, layer)
        h = arch.hidden_size
        self.enorm = RMSNorm(h, arch.rms_norm_eps)
        self.hnorm = RMSNorm(h, arch.rms_norm_eps)
        self.eh_proj = Linear(2 * h, h)
        self.shared_head = _SharedHead(RMSNorm(h, arch.rms_norm_eps))

    def predict(self, rope, embeds: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(hidden)], dim=-1))
        return self(rope, x)


class MTPModules(nn.Module):
    """Named like the checkpoint (layers.<num_layers + j>.…) so the decoder's weight loader fills it."""

    def __init__(self, arch: ArchConfig) -> None:
        super().__init__()
        self.arch = arch
        first = arch.num_layers - arch.num_mtp_layers
        self.layers = nn.ModuleDict({str(first + j): MTPLayer(arch, first + j) for j in range(arch.num_mtp_layers)})

    def module(self, j: int) -> MTPLayer:
        return cast(MTPLayer, self.layers[str(self.arch.num_layers - self.arch.num_mtp_layers + j)])


@dataclass(slots=True)
class _State:
    valid: list[int]
    """Per module: positions [0, valid) hold KV computed from committed tokens."""
    carry: list[dict[int, torch.Tensor]] = field(default_factory=list)
    """carry[j]: module j-1's outputs at positions module j has not consumed yet (j >= 1)."""


@dataclass(slots=True)
class _Work:
    """One request's part of one module's forward."""

    request: Request
    lo: int
    hi: int
    hidden: list[torch.Tensor]
    tokens: list[int]
    drafting: bool
    """Whether hi is the request's computed length and the last row drafts a token."""


class MTPProposer(Proposer):
    name = "mtp"

    def __init__(
        self,
        modules: MTPModules,
        target: DecoderModel,
        cache: KVCache,
        group: int,
        spec: KVGroupSpec,
        backend: AttentionBackend,
        kv: KVCacheManager,
        device: torch.device,
    ) -> None:
        self.modules_ = modules
        self.target = target
        self.cache = cache
        self.group = group
        self.spec = spec
        self.backend = backend
        self.kv = kv
        self.device = device
        self.num_modules = modules.arch.num_mtp_layers
        self.max_proposal = self.num_modules
        self._states: dict[str, _State] = {}

    @classmethod
    def build(cls, config: EngineConfig, target) -> MTPProposer:
        arch = target.model.arch
        n = arch.num_mtp_layers
        g = next((i for i, spec in enumerate(target.groups) if spec.window is None), 0)
        window = target.groups[g].window
        ext = dataclasses.replace(
            arch, num_layers=arch.num_layers + n, layer_windows=arch.layer_windows + (window,) * n
        )
        with torch.device("meta"):
            modules = MTPModules(ext)
        modules = modules.to_empty(device=target.device)
        first = arch.num_layers
        load_hf_weights(
            modules,
            ext,
            iter_weights(target.source),
            keep=lambda name: (layer_index(name) or -1) >= first and not name.endswith(_SHARED),
        )
        modules = modules.to(target.dtype).eval()
        if config.pack_weights:
            for m in modules.modules():
                if isinstance(m, Linear):
                    m.use(build_weight("none", m.weight.data))
        spec = KVGroupSpec(window, tuple(range(first, first + n)))
        heads, dim = arch.kv_cache_layout
        cache = KVCache(
            [spec], [target.cache.blocks_per_group[g]], target.cache.block_size, heads, dim, target.dtype, target.device
        )
        return cls(modules, target.model, cache, g, spec, target.backend, target.kv, target.device)

    def rounds(self, k: int) -> int:
        return k

    def forget(self, request_id: str) -> None:
        self._states.pop(request_id, None)

    @torch.inference_mode()
    def propose(self, step: StepView, requests: list[Request], budgets: list[int]) -> list[Proposal]:
        budget = {r.request_id: k for r, k in zip(requests, budgets)}
        drafts: dict[str, list[int]] = {r.request_id: [] for r in requests}
        live: dict[str, _Live] = {}
        for s in step.plan.scheduled:
            r = s.request
            if r.finished:
                continue
            state = self._states.get(r.request_id)
            if state is None or state.valid[0] != s.start:  # new, or recomputed from a prefix-cache hit
                self._states[r.request_id] = _State([s.start] * self.num_modules, [{} for _ in range(self.num_modules)])
            row = step.run.token_start[r.request_id]
            live[r.request_id] = _Live(r, s.start, step.run.hidden[row : row + r.num_computed_tokens - s.start])
        for j in range(self.num_modules):
            work = {
                rid: w
                for rid, v in live.items()
                if (w := self._work(j, v, budget.get(rid, 0), drafts.get(rid))) is not None
            }
            outputs = self._forward(j, list(work.values()), drafts) if work else {}
            live = self._advance(j, live, work, outputs)
        return [Proposal(drafts[r.request_id][: budget[r.request_id]]) for r in requests]

    def _work(self, j: int, live: _Live, k: int, drafts: list[int] | None) -> _Work | None:
        """Module j's positions for one request: from its valid KV to where its inputs are known (to the computed
        length, with the drafts so far as inputs, when it is to draft)."""
        r, state = live.request, self._states[live.request.request_id]
        c = r.num_computed_tokens
        drafting = drafts is not None and k > j and len(drafts) == j and r.num_tokens == c + 1
        hi = c if drafting else _valid_end(r, j)
        lo = state.valid[j]
        while lo < live.start and lo not in state.carry[j]:
            lo += 1  # inputs lost (a prefix-cache hit): those positions keep the KV they hold
        if hi <= lo:
            return None
        hidden = [state.carry[j][p] if p < live.start else live.hidden[p - live.start] for p in range(lo, hi)]
        sequence = r.all_token_ids + drafts if drafts else r.all_token_ids
        return _Work(r, lo, hi, hidden, sequence[lo + j + 1 : hi + j + 1], drafting)

    def _forward(self, j: int, work: list[_Work], drafts: dict[str, list[int]]) -> dict[str, torch.Tensor]:
        """Module j over every request's positions in one batch; appends the drafted tokens."""
        order = sorted(work, key=lambda w: w.hi - w.lo != 1)
        ids: list[int] = []
        positions: list[int] = []
        hidden: list[torch.Tensor] = []
        layouts: list[SeqLayout] = []
        for w in order:
            tables = (self.kv.block_tables(w.request.request_id)[self.group],)
            layouts.append(SeqLayout(len(ids), w.hi - w.lo, w.lo, tables))
            ids.extend(w.tokens)
            positions.extend(range(w.lo, w.hi))
            hidden.extend(w.hidden)
        model, module = self.target, self.modules_.module(j)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        embeds = model.embed_tokens(input_ids)
        if model.arch.embed_scale != 1.0:
            embeds = embeds * torch.tensor(model.arch.embed_scale, dtype=embeds.dtype)
        rope = (model.rope_full if self.spec.window is None else model.rope_sliding).table(pos, embeds.dtype)
        metadata = self.backend.build_metadata(layouts, [self.spec], self.cache.block_size, self.device)
        with forward_context(ForwardContext(self.backend, metadata, self.cache)):
            out = module.predict(rope, embeds, torch.stack(hidden))
        ends = [layout.token_start + layout.num_tokens for layout in layouts]
        last = [end - 1 for w, end in zip(order, ends) if w.drafting]
        if last:
            rows = out.index_select(0, torch.tensor(last, device=self.device))
            tokens = model.compute_logits(module.shared_head.norm(rows)).argmax(dim=-1).tolist()
            for w, token in zip([w for w in order if w.drafting], tokens):
                drafts[w.request.request_id].append(token)
        return {w.request.request_id: out[layout.token_start : end] for w, layout, end in zip(order, layouts, ends)}

    def _advance(
        self, j: int, live: dict[str, _Live], work: dict[str, _Work], outputs: dict[str, torch.Tensor]
    ) -> dict[str, _Live]:
        """Record module j's valid KV and keep the previous module's outputs it will still need; returns its own
        outputs as the next module's inputs."""
        following: dict[str, _Live] = {}
        for rid, v in live.items():
            state = self._states[rid]
            end = _valid_end(v.request, j)
            if j:
                # Module j - 1's outputs that module j has not consumed with known inputs yet.
                kept = {p: h for p, h in state.carry[j].items() if end <= p < v.start}
                kept.update((p, v.hidden[p - v.start]) for p in range(max(end, v.start), _valid_end(v.request, j - 1)))
                state.carry[j] = kept
            w = work.get(rid)
            if w is not None:
                state.valid[j] = max(state.valid[j], end)
                following[rid] = _Live(v.request, w.lo, outputs[rid])
        return following


@dataclass(slots=True)
class _Live:
    """A request's inputs for the next module: hidden states from position `start` on."""

    request: Request
    start: int
    hidden: torch.Tensor


def _valid_end(request: Request, j: int) -> int:
    """Module j's KV is valid up to here: its input at position p needs token p + j + 1, and p must be computed."""
    return min(request.num_computed_tokens, request.num_tokens - j - 1)
