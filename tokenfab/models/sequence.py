"""One sequence through a model outside the engine: a prefill from position 0 over a KV cache of its own.

Scoring (tokenfab.evaluation) and calibration (tokenfab.models.calibration) read a window's final hidden
states this way; serving goes through the engine's Worker instead.
"""

from __future__ import annotations

import torch

from tokenfab.attention.backend import ForwardContext, KVCache, KVGroupSpec, SeqLayout, forward_context
from tokenfab.attention.torch_backend import TorchAttentionBackend
from tokenfab.models.decoder import DecoderModel

BLOCK_SIZE = 16


@torch.inference_mode()
def sequence_hidden(model: DecoderModel, ids: list[int]) -> torch.Tensor:
    """Final hidden states [T, hidden] of one sequence, prefilled at once from position 0."""
    arch = model.arch
    device, dtype = model.norm.weight.device, model.norm.weight.dtype
    groups = [KVGroupSpec(w, tuple(layers)) for w, layers in arch.window_groups.items()]
    blocks = -(-len(ids) // BLOCK_SIZE) + 1  # + the null block, which no table uses
    cache = KVCache(groups, [blocks] * len(groups), BLOCK_SIZE, *arch.kv_cache_layout, dtype, device)
    table = list(range(1, blocks))
    layout = SeqLayout(0, len(ids), 0, tuple(table for _ in groups))
    backend = TorchAttentionBackend()
    metadata = backend.build_metadata([layout], groups, BLOCK_SIZE, device)
    with forward_context(ForwardContext(backend, metadata, cache)):
        return model(torch.tensor(ids, device=device), torch.arange(len(ids), device=device))
