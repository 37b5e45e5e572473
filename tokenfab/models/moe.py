"""Mixture-of-experts feed-forward (Qwen3-MoE, Mixtral, DeepSeek-V3): a router picks each token's top-k experts,
tokens are grouped by expert and each expert runs once per step on its whole group; DeepSeek-V3's shared experts
run on every token beside them.

Every expert is a gated MLP of the engine's own `Linear`s, so experts take any weight format (int8, int4, fp8,
bf16, … see tokenfab.quant) and run on the same CPU kernels as a dense layer; the step's Python cost is one loop
over the experts that received tokens, never over tokens. The layer counts the tokens each expert received
(`tokens`), which the engine reports per expert and as an imbalance.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from tokenfab.kernels import triton_moe
from tokenfab.models.arch import ArchConfig
from tokenfab.models.expert_parallel import ExpertParallel, Placement
from tokenfab.models.layers import Linear, gated_activation
from tokenfab.quant.bf16 import fused_gated_mlp
from tokenfab.quant.dense import DenseWeight


class Expert(nn.Module):
    """One expert: down(act(gate(x)) * up(x)), gate and up fused as in the dense MLP."""

    def __init__(self, hidden: int, intermediate: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.gate_up_proj = Linear(hidden, 2 * intermediate)
        self.down_proj = Linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gelu = self.activation == "gelu_tanh"
        fused = fused_gated_mlp(self.gate_up_proj.stored, self.down_proj.stored, x, gelu)
        if fused is not None:
            return fused
        return self.down_proj(gated_activation(self.activation, self.gate_up_proj(x)))


class Router(nn.Module):
    """The gate: one logit per expert. Kept out of the weight formats (it is small, and routing decides which
    experts run, so it stays in the model's dtype). `bias`: DeepSeek-V3's score correction, which steers the
    choice of experts but not their weights."""

    def __init__(self, hidden: int, num_experts: int, bias: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


def softmax_top_k(logits: torch.Tensor, k: int, normalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k], experts [T, k]) of softmax routing: probabilities over all experts in fp32, the k largest,
    renormalized to sum to one where `normalize` (Mixtral always, Qwen3-MoE by `norm_topk_prob`)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, experts = torch.topk(probs, k, dim=-1)
    if normalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, experts


def sigmoid_group_top_k(
    logits: torch.Tensor, k: int, bias: torch.Tensor, groups: int, topk_groups: int, normalize: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3's routing: sigmoid scores; experts chosen on score + bias, from the `topk_groups` groups whose
    two best biased scores sum highest; weighted by their unbiased scores (renormalized where `normalize`) times
    `scale`."""
    scores = torch.sigmoid(logits.float())
    choice = scores + bias.float()
    if groups > 1:
        per_group = choice.view(choice.shape[0], groups, choice.shape[1] // groups)
        best = per_group.topk(min(2, per_group.shape[-1]), dim=-1)[0].sum(dim=-1)
        kept = torch.zeros_like(best).scatter_(1, best.topk(topk_groups, dim=-1)[1], 1.0).bool()
        choice = per_group.masked_fill(~kept.unsqueeze(-1), float("-inf")).view_as(choice)
    experts = choice.topk(k, dim=-1)[1]
    weights = scores.gather(1, experts)
    if normalize:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * scale, experts


def group_by_expert(experts: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (token, slot) pairs of a [T, k] routing sorted by expert (stable: within an expert, by token), as
    flat indices into experts.view(-1), and how many each expert got."""
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    return order, torch.bincount(flat, minlength=num_experts)


class SparseMoE(nn.Module):
    """The MoE feed-forward of one layer. `experts`: the routed experts this process holds, by expert id (all of
    them, or with expert parallelism this rank's share: see tokenfab.models.expert_parallel)."""

    def __init__(self, arch: ArchConfig, held: Sequence[int] | None = None) -> None:
        super().__init__()
        self.num_experts = arch.num_experts
        self.top_k = arch.num_experts_per_tok
        self.normalize = arch.norm_topk_prob
        self.routing = arch.moe
        self.activation = arch.activation
        self.hidden_size, self.intermediate_size = arch.hidden_size, arch.moe_intermediate_size
        self.gate = Router(arch.hidden_size, arch.num_experts, bias=arch.moe.scoring == "sigmoid")
        ids = range(arch.num_experts) if held is None else held
        self.experts = nn.ModuleDict({str(e): self.new_expert() for e in ids})
        shared = arch.moe.num_shared_experts * arch.moe_intermediate_size
        self.shared_experts = Expert(arch.hidden_size, shared, arch.activation) if shared else None
        self._tokens: torch.Tensor | None = None  # set at the first forward (the module may be built on meta)
        self.parallel: ExpertParallel | None = None
        self.hosts: torch.Tensor | None = None
        """With expert parallelism, [experts, ranks]: the ranks holding each expert, repeated round to `ranks`
        columns, so column (token mod ranks) spreads an expert's tokens over its copies."""
        self.computed = 0
        """Token-expert pairs this process's experts computed."""
        self.stacked: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        """(gate_up [experts held, 2I, H], down [experts held, H, I], slot of each expert id) for the grouped GEMM
        (see stack_experts)."""

    def new_expert(self) -> Expert:
        return Expert(self.hidden_size, self.intermediate_size, self.activation)

    def place(self, parallel: ExpertParallel, placement: Placement) -> None:
        """Serve as one rank of `parallel`: tokens go to the ranks `placement` names (whose experts this rank
        holds: the caller loads them)."""
        hosts = placement.hosts(self.num_experts)
        if self.stacked is not None:
            self.stack_experts()  # the experts held changed
        self.parallel = parallel
        self.hosts = torch.tensor([[h[i % len(h)] for i in range(parallel.size)] for h in hosts], dtype=torch.int64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, experts = self.route(x)
        out = self.run_experts(x, weights, experts)
        return out if self.shared_experts is None else out + self.shared_experts(x)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] fp32, experts [T, k]) of each token."""
        logits = self.gate(x)
        r = self.routing
        if r.scoring == "sigmoid":
            assert self.gate.e_score_correction_bias is not None
            return sigmoid_group_top_k(
                logits,
                self.top_k,
                self.gate.e_score_correction_bias,
                r.num_groups,
                r.topk_groups,
                self.normalize,
                r.routed_scaling_factor,
            )
        return softmax_top_k(logits, self.top_k, self.normalize)

    def run_experts(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """sum over each token's k experts of weight * expert(x), experts in ascending order (the order
        transformers sums them in), wherever the experts run."""
        order, histogram = group_by_expert(experts, self.num_experts)
        self._tokens = histogram if self._tokens is None else self._tokens + histogram
        tokens = order // self.top_k
        pair_experts = experts.reshape(-1)[order]
        if self.parallel is None:  # the pairs are in expert order already
            y = self._compute_sorted(x.index_select(0, tokens), histogram)
        else:
            assert self.hosts is not None
            dest = self.hosts[pair_experts, tokens % self.parallel.size]
            by_dest = torch.argsort(dest, stable=True)
            sent = self.parallel.exchange(
                x.index_select(0, tokens[by_dest]), pair_experts[by_dest], dest[by_dest], self.compute
            )
            y = torch.empty_like(sent)
            y[by_dest] = sent
        scale = weights.reshape(-1)[order].to(x.dtype).unsqueeze(1)
        out = torch.zeros_like(x)
        start = 0
        for n in histogram.tolist():
            if n:
                out.index_add_(0, tokens[start : start + n], y[start : start + n] * scale[start : start + n])
                start += n
        return out

    def compute(self, rows: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Each row through its expert (one call per expert over all its rows, or with stacked experts one grouped
        GEMM launch per projection for all of them); rows in any order."""
        order = torch.argsort(experts, stable=True)
        out = torch.empty_like(rows)
        out[order] = self._compute_sorted(
            rows.index_select(0, order), torch.bincount(experts, minlength=self.num_experts)
        )
        return out

    def _compute_sorted(self, rows: torch.Tensor, histogram: torch.Tensor) -> torch.Tensor:
        """compute() of rows already in expert order, `histogram[e]` of them for expert e."""
        self.computed += rows.shape[0]
        ids = histogram.nonzero().flatten()
        counts = histogram[ids].tolist()
        if self.stacked is not None and rows.shape[0]:
            gate_up, down, slot = self.stacked
            slots = slot[ids].tolist()
            h = gated_activation(self.activation, triton_moe.grouped_matmul(rows, gate_up, slots, counts))
            return triton_moe.grouped_matmul(h, down, slots, counts)
        out = torch.empty_like(rows)
        start = 0
        for e, n in zip(ids.tolist(), counts):
            out[start : start + n] = self.experts[str(e)](rows[start : start + n])
            start += n
        return out

    def stack_experts(self) -> bool:
        """Hold the experts' weights as two stacked tensors ([experts, 2 × intermediate, hidden] and [experts,
        hidden, intermediate]) that the Triton grouped GEMM reads (tokenfab.kernels.triton_moe; the GPU path);
        each expert's projections become views of them, so nothing is held twice. Only for plain and unquantized
        dense weights (quantized experts keep their own kernels); whether the experts are stacked now."""
        self.stacked = None
        held = sorted(int(e) for e in self.experts)
        experts = [cast(Expert, self.experts[str(e)]) for e in held]
        linears = [(x.gate_up_proj, x.down_proj) for x in experts]
        dense = [_dense(linear) for pair in linears for linear in pair]
        if not triton_moe.available() or not held or any(w is None for w in dense):
            return False
        gate_up = torch.stack([w for w in dense[0::2] if w is not None])
        down = torch.stack([w for w in dense[1::2] if w is not None])
        for i, (a, b) in enumerate(linears):
            _rebind(a, gate_up[i])
            _rebind(b, down[i])
        slot = torch.full((self.num_experts,), -1, dtype=torch.int64)
        slot[held] = torch.arange(len(held))
        self.stacked = (gate_up, down, slot)
        return True

    @property
    def tokens(self) -> torch.Tensor:
        """Tokens routed to each expert since start (the engine's stats and the load balancer read it)."""
        return self._tokens if self._tokens is not None else torch.zeros(self.num_experts, dtype=torch.int64)

    @property
    def active_fraction(self) -> float:
        """The share of the routed experts' weights one token reads."""
        return self.top_k / self.num_experts


def _dense(linear: Linear) -> torch.Tensor | None:
    """The plain weight a Linear computes with, if it is plain or dense-stored; None for packed or quantized."""
    if linear.stored is None:
        return linear.weight.data
    return linear.stored.weight if isinstance(linear.stored, DenseWeight) else None


def _rebind(linear: Linear, view: torch.Tensor) -> None:
    if linear.stored is None:
        linear.weight = nn.Parameter(view, requires_grad=False)
    else:
        linear.stored = DenseWeight(view)
