"""Step costs of a GPU nobody profiled, from its memory bandwidth and its FLOPs (a roofline): what the planner uses
for a device kind until `tokenfab profile` has run on one. Every number here is a model, and every output that uses
it says "modelled".

    overhead          = weights / bandwidth + kernel launches per layer
    prefill_tokens    = dense FLOPs per token / achieved FLOP rate
    prefill_attention = attention FLOPs per (token x 1000 context tokens) / achieved FLOP rate
    decode_seqs       = dense FLOPs per token / achieved FLOP rate + per-sequence bookkeeping
                        + the sliding-window layers' KV (a whole window per sequence) / bandwidth
    decode_context    = full-attention layers' KV bytes per token / bandwidth
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenfab.models.arch import ArchConfig
from tokenfab.sim.simulator import ReplicaShape
from tokenfab.sim.step_cost import StepCostModel


@dataclass(frozen=True, slots=True)
class GpuSpec:
    """Datasheet figures of one GPU (dense bf16, no sparsity)."""

    name: str
    memory_gb: float
    bandwidth_gb_s: float
    bf16_tflops: float


GPUS = {
    g.name: g
    for g in (
        GpuSpec("l4", 24, 300, 121),
        GpuSpec("a100", 80, 2039, 312),
        GpuSpec("h100", 80, 3350, 989),
        GpuSpec("h200", 141, 4800, 989),
    )
}
BANDWIDTH_EFFICIENCY = 0.7
"""Share of the datasheet bandwidth a decode step's reads achieve."""
MFU = 0.4
"""Share of the datasheet FLOP rate a prefill achieves."""
LAUNCH_S_PER_LAYER = 1.2e-4
"""Kernel launches and host work per layer per step (an eager forward, about a dozen kernels a layer)."""
SEQ_S = 2e-5
"""Per decoding sequence: sampling and bookkeeping."""
KV_BYTES = 2
"""bf16 KV on a GPU."""
RESERVED_GB = 2.0
"""Activations, the CUDA context and the allocator's slack, kept out of the KV budget."""
MAX_NUM_SEQS = 256
MAX_NUM_BATCHED_TOKENS = 8192


def roofline_cost(gpu: GpuSpec, arch: ArchConfig, usd_per_hour: float) -> StepCostModel:
    bandwidth = gpu.bandwidth_gb_s * 1e9 * BANDWIDTH_EFFICIENCY
    flops = gpu.bf16_tflops * 1e12 * MFU
    kv_per_layer_token = 2 * arch.kv_size * KV_BYTES
    full = sum(1 for w in arch.layer_windows if w is None)
    window_bytes = sum(kv_per_layer_token * w for w in arch.layer_windows if w is not None)
    dense = arch.flops_per_token(0)
    coef = {
        "overhead": arch.num_params * KV_BYTES / bandwidth + arch.num_layers * LAUNCH_S_PER_LAYER,
        "prefill_tokens": dense / flops,
        "prefill_attention": 4 * arch.num_layers * arch.num_heads * arch.head_dim * 1000 / flops,
        "decode_seqs": dense / flops + SEQ_S + window_bytes / bandwidth,
        "decode_context": full * kv_per_layer_token / bandwidth,
    }
    meta = {
        "modelled": f"roofline of {gpu.name}: {gpu.bandwidth_gb_s:g} GB/s x {BANDWIDTH_EFFICIENCY}, "
        f"{gpu.bf16_tflops:g} bf16 TFLOP/s x {MFU}, {LAUNCH_S_PER_LAYER * 1e6:.0f} us launches per layer",
        "device": gpu.name,
        "usd_per_hour": usd_per_hour,
    }
    return StepCostModel(coef, meta)


def roofline_shape(gpu: GpuSpec, arch: ArchConfig, profiled: ReplicaShape, block_size: int = 16) -> ReplicaShape:
    """A GPU replica's KV pools (its memory less the weights and a reserve, split over the window groups as the
    profiled engine split its own, capped at what its sequences can use) and a GPU engine's batch limits."""
    kv_bytes = max(gpu.memory_gb - RESERVED_GB, 0.5) * 1e9 - arch.num_params * KV_BYTES
    groups = arch.window_groups
    per_block = [len(layers) * 2 * arch.kv_size * KV_BYTES * block_size for layers in groups.values()]
    # The profiled split between the groups (the sliding-window groups need only a window per sequence).
    share = [b * p for b, p in zip(profiled.blocks_per_group, per_block)]
    total = sum(share) or 1
    # At most what every sequence at its longest needs: more only adds prefix-cache room, and a block pool of
    # millions of blocks would make each simulated run slow to set up.
    cap = MAX_NUM_SEQS * -(-profiled.max_model_len // block_size)
    blocks = [min(cap, max(2, int(kv_bytes * s / total / p))) for s, p in zip(share, per_block)]
    return ReplicaShape(list(groups), blocks, block_size, MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS, profiled.max_model_len)
