"""ModelRunner: a StepPlan -> flat token batch (ids, positions, block tables) -> model forward -> sampling logits.

Single-token sequences are placed first so the attention backend can batch them; logits are computed only for
the positions whose next token is wanted: the last token of requests that sample this step, plus each draft
token under verification (the LM head is most of a small model's FLOPs). The final hidden states of every
token are handed back too: MTP heads read them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from tokenfab.attention.backend import (
    AttentionBackend,
    ForwardContext,
    KVCache,
    KVGroupSpec,
    SeqLayout,
    forward_context,
)
from tokenfab.engine.types import ScheduledRequest, StepPlan
from tokenfab.models.cpu_decode import CpuDecodeStep
from tokenfab.models.decoder import DecoderModel


@dataclass(slots=True)
class RunOutput:
    samplers: list[ScheduledRequest]
    """Requests that sample this step, in the order of their logit rows."""
    logits: torch.Tensor
    """[sum of samplers' num_logit_rows, vocab] fp32: each sampler's rows are consecutive."""
    hidden: torch.Tensor
    """[tokens, hidden]: final hidden state of every token of the step."""
    token_start: dict[str, int]
    """Request id -> row of its first token in `hidden`."""


class ModelRunner:
    def __init__(
        self,
        model: DecoderModel,
        cache: KVCache,
        backend: AttentionBackend,
        groups: list[KVGroupSpec],
        device: torch.device,
    ) -> None:
        self.model = model
        self.cache = cache
        self.backend = backend
        self.groups = groups
        self.device = device
        self.decode_step = CpuDecodeStep.bind(model, cache)
        """Decode-only steps in one kernel call where the model qualifies (see tokenfab.models.cpu_decode)."""

    @torch.inference_mode()
    def execute(self, plan: StepPlan, block_tables: Callable[[str], tuple[list[int], ...]]) -> RunOutput:
        """Run one step: the model over every scheduled token, logits at the sampling positions."""
        order = sorted(plan.scheduled, key=lambda s: s.num_tokens != 1)
        ids: list[int] = []
        positions: list[int] = []
        layouts: list[SeqLayout] = []
        sample_rows: list[int] = []
        samplers: list[ScheduledRequest] = []
        token_start: dict[str, int] = {}
        for s in order:
            token_start[s.request.request_id] = len(ids)
            layouts.append(SeqLayout(len(ids), s.num_tokens, s.start, block_tables(s.request.request_id)))
            ids.extend(s.token_ids())
            positions.extend(range(s.start, s.end))
            if s.samples:
                sample_rows.extend(range(len(ids) - s.num_logit_rows, len(ids)))
                samplers.append(s)
        metadata = self.backend.build_metadata(layouts, self.groups, self.cache.block_size, self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        with forward_context(ForwardContext(self.backend, metadata, self.cache)):
            hidden = self.decode_step.forward(input_ids, pos, metadata) if self.decode_step is not None else None
            if hidden is None:
                hidden = self.model(input_ids, pos)
        if not sample_rows:
            logits = hidden.new_empty((0, self.model.arch.vocab_size), dtype=torch.float32)
        else:
            rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
        return RunOutput(samplers, logits, hidden, token_start)
