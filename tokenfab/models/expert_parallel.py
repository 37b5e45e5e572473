"""Expert parallelism: the experts of each MoE layer spread over the ranks of a torch.distributed group (gloo on
CPU; NCCL on GPU, not yet run on one), attention data-parallel (each rank its own requests and KV cache).

Each rank holds `slots` experts per MoE layer (E / ranks, plus its share of the redundant copies EPLB adds). In a
MoE layer a rank routes its own tokens, sends each (token, expert) pair to a rank holding that expert (all-to-all:
the pair counts, then the rows with their expert ids in one tensor), computes the rows it received grouped by
expert on its local experts, sends the results back (all-to-all) and combines them exactly as one process does —
weighted, summed over the token's experts in ascending expert order — so a token's output does not depend on the
number of ranks or on where its experts live. Every rank enters every MoE layer of every step: one without work
runs the layers' exchanges with no rows (`ExpertParallel.idle_step`).

EPLB (`rebalance`, DeepSeek's balancing without its node hierarchy): from the token counts each expert received,
hot experts get the redundant slots (one more copy at a time to the expert with the most tokens per copy), then
copies are packed onto ranks heaviest first, each to the least loaded rank with a free slot and no copy of that
expert yet.
"""

from __future__ import annotations

import datetime
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True, slots=True)
class Placement:
    """Which experts each rank holds in one MoE layer: ranks[r] lists rank r's experts (`slots` each)."""

    ranks: tuple[tuple[int, ...], ...]

    @classmethod
    def initial(cls, num_experts: int, num_ranks: int, redundant: int = 0) -> Placement:
        """The placement of an even load: experts dealt round the ranks, the redundant slots copies of the first
        ones, until a load is measured."""
        return rebalance([1.0] * num_experts, num_ranks, redundant)

    @property
    def slots(self) -> int:
        return len(self.ranks[0])

    def hosts(self, num_experts: int) -> list[list[int]]:
        """Per expert: the ranks holding it (ascending)."""
        out: list[list[int]] = [[] for _ in range(num_experts)]
        for rank, experts in enumerate(self.ranks):
            for e in experts:
                out[e].append(rank)
        return out


def rebalance(load: Sequence[float], num_ranks: int, redundant: int) -> Placement:
    """The placement for measured per-expert `load` (tokens): copies first, then packing (see the module doc)."""
    num_experts = len(load)
    total = num_experts + redundant
    if total % num_ranks:
        raise ValueError(
            f"{num_experts} experts + {redundant} redundant do not divide over {num_ranks} ranks; "
            f"choose num_redundant_experts so that the sum is a multiple of the ranks"
        )
    if redundant > num_experts * (num_ranks - 1):
        raise ValueError(f"{redundant} redundant experts: at most {num_experts * (num_ranks - 1)} (a copy per rank)")
    copies = [1] * num_experts
    for _ in range(redundant):
        e = max((i for i in range(num_experts) if copies[i] < num_ranks), key=lambda i: (load[i] / copies[i], -i))
        copies[e] += 1
    slots = total // num_ranks
    items = sorted(
        ((load[e] / copies[e], e) for e in range(num_experts) for _ in range(copies[e])), key=lambda t: (-t[0], t[1])
    )
    ranks: list[list[int]] = [[] for _ in range(num_ranks)]
    weight = [0.0] * num_ranks
    for share, e in items:
        free = [r for r in range(num_ranks) if len(ranks[r]) < slots and e not in ranks[r]]
        r = min(free, key=lambda r: (weight[r], len(ranks[r]), r))
        ranks[r].append(e)
        weight[r] += share
    return Placement(tuple(tuple(sorted(r)) for r in ranks))


class ExpertParallel:
    """This process's rank of the expert-parallel group, and the exchanges of its MoE layers."""

    def __init__(
        self, rank: int, size: int, master: str, device: torch.device | None = None, timeout_s: float = 120.0
    ) -> None:
        """`master`: host:port of rank 0's rendezvous store (every rank gives the same); `device`: where the
        exchanged tensors live (gloo on CPU, NCCL on CUDA)."""
        self.rank, self.size = rank, size
        self.device = device or torch.device("cpu")
        host, _, port = master.rpartition(":")
        store = dist.TCPStore(host, int(port), size, is_master=rank == 0, timeout=datetime.timedelta(seconds=timeout_s))
        dist.init_process_group(
            "nccl" if self.device.type == "cuda" else "gloo",
            store=store,
            rank=rank,
            world_size=size,
            timeout=datetime.timedelta(seconds=timeout_s),
        )
        self.exchange_seconds = 0.0
        """Time spent in the all-to-alls (the share of the step the experts' communication costs)."""

    def any(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (every rank calls this at the same point)."""
        t = torch.tensor([int(flag)], dtype=torch.int32, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """`t` summed over the ranks (in place)."""
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return t

    def exchange(
        self, rows: torch.Tensor, experts: torch.Tensor, dest: torch.Tensor, compute: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        """Send rows [P, H] (sorted by `dest` rank) with their expert ids to their ranks, apply
        compute(received rows, their experts) there, and return the results in the order sent."""
        start = time.perf_counter()
        send_counts = torch.bincount(dest, minlength=self.size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts)
        sends, recvs = send_counts.tolist(), recv_counts.tolist()
        hidden = rows.shape[1]
        packed = torch.cat((rows.float(), experts.to(torch.float32).unsqueeze(1)), dim=1)  # ids < 2^24: exact
        got = packed.new_empty(sum(recvs), hidden + 1)
        dist.all_to_all_single(got, packed, recvs, sends)
        self.exchange_seconds += time.perf_counter() - start
        out = compute(got[:, :hidden].to(rows.dtype), got[:, hidden].long())
        start = time.perf_counter()
        back = out.new_empty(rows.shape[0], out.shape[1])
        dist.all_to_all_single(back, out.contiguous(), sends, recvs)
        self.exchange_seconds += time.perf_counter() - start
        return back

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
