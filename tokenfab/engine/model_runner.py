"""ModelRunner: a StepPlan -> flat token batch (ids, positions, block tables) -> model forward -> sampling logits.

Single-token sequences are placed first so the attention backend can batch them; logits are computed only for
the last token of requests that sample this step (the LM head is most of a small model's FLOPs).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from tokenfab.attention.backend import AttentionBackend, ForwardContext, KVCache, KVGroupSpec, SeqLayout, forward_context
from tokenfab.engine.types import ScheduledRequest, StepPlan
from tokenfab.models.decoder import DecoderModel


class ModelRunner:
    def __init__(self, model: DecoderModel, cache: KVCache, backend: AttentionBackend,
                 groups: list[KVGroupSpec], device: torch.device) -> None:
        self.model = model
        self.cache = cache
        self.backend = backend
        self.groups = groups
        self.device = device

    @torch.inference_mode()
    def execute(self, plan: StepPlan, block_tables: Callable[[str], tuple[list[int], ...]]
                ) -> tuple[list[ScheduledRequest], torch.Tensor]:
        """Run one step; returns the requests that sample, in order, and their logits [n, vocab] (fp32)."""
        order = sorted(plan.scheduled, key=lambda s: s.num_tokens != 1)
        ids: list[int] = []
        positions: list[int] = []
        layouts: list[SeqLayout] = []
        sample_rows: list[int] = []
        samplers: list[ScheduledRequest] = []
        for s in order:
            tokens = s.request.all_token_ids[s.start : s.end]
            layouts.append(SeqLayout(len(ids), s.num_tokens, s.start, block_tables(s.request.request_id)))
            ids.extend(tokens)
            positions.extend(range(s.start, s.end))
            if s.samples:
                sample_rows.append(len(ids) - 1)
                samplers.append(s)
        metadata = self.backend.build_metadata(layouts, self.groups, self.cache.block_size, self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        pos = torch.tensor(positions, dtype=torch.long, device=self.device)
        with forward_context(ForwardContext(self.backend, metadata, self.cache)):
            hidden = self.model(input_ids, pos)
        if not sample_rows:
            return [], hidden.new_empty((0, self.model.arch.vocab_size), dtype=torch.float32)
        rows = torch.tensor(sample_rows, dtype=torch.long, device=self.device)
        return samplers, self.model.compute_logits(hidden.index_select(0, rows))
