"""Planner: the cheapest deployment that meets an SLO at a given load, found by running the load in the simulator on
every candidate deployment.

A candidate is a replica variant (a profiled engine: this machine's CPU with its threads and weight format; or a GPU
kind whose step costs come from a roofline, labelled modelled) x a replica count x a batch limit (max_num_seqs).
Each one replays the same requests (the same arrivals, the same prompts) through the real scheduler and routing
policy; it meets the SLO when at least `attainment` of its requests do (first token within the TTFT SLO and decode
within the TPOT SLO), and costs its replicas' price over the time it served the load, per million output tokens.
The plan is the cheapest candidate that meets the SLO (fewer replicas on a tie), the runners-up, and the Pareto
frontier of cost against TTFT p90 over every candidate.

With an open-loop load (a rate or a trace) the tokens served are the load's whatever the deployment, so more
replicas of a variant only cost more once they meet the SLO: the search stops a variant one replica count past its
first success (that point is kept for the frontier).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

from tokenfab.bench.stats import pareto_front
from tokenfab.cluster.policies import make_policy
from tokenfab.sim.run import SimLoad, run_load
from tokenfab.sim.simulator import ReplicaShape
from tokenfab.sim.step_cost import StepCostModel


@dataclass(frozen=True, slots=True)
class Variant:
    """One kind of replica the planner may deploy."""

    name: str
    cost: StepCostModel
    shape: ReplicaShape
    """Its KV pools and limits (max_num_seqs is what the search varies)."""
    usd_per_hour: float
    """One replica's price."""
    serve_flags: tuple[str, ...] = ()
    """What `tokenfab serve` needs to run a replica like it (besides --replicas and --max-num-seqs)."""
    modelled: bool = False
    """Step costs from a model of the device (roofline), not a profile of it."""
    batch_limits: tuple[int, ...] = ()
    """max_num_seqs values to try (default: the shape's)."""


@dataclass(slots=True)
class Candidate:
    variant: str
    replicas: int
    max_num_seqs: int
    usd_per_hour: float
    modelled: bool
    meets_slo: bool
    goodput_fraction: float
    usd_per_mtok_output: float | None
    output_tok_s: float | None
    ttft_p50_s: float | None
    ttft_p90_s: float | None
    tpot_p50_s: float | None
    completed: int
    serve_command: str = ""

    @property
    def sort_key(self) -> tuple[float, int, float, int]:
        cost = self.usd_per_mtok_output if self.usd_per_mtok_output is not None else float("inf")
        return (cost, self.replicas, self.usd_per_hour, self.max_num_seqs)


@dataclass(slots=True)
class Plan:
    best: Candidate | None
    runners_up: list[Candidate]
    frontier: list[Candidate]
    candidates: list[Candidate] = field(default_factory=list)

    def as_dict(self) -> dict:
        def one(c: Candidate | None) -> dict | None:
            return None if c is None else asdict(c)

        return {
            "best": one(self.best),
            "runners_up": [asdict(c) for c in self.runners_up],
            "frontier": [asdict(c) for c in self.frontier],
            "candidates": [asdict(c) for c in self.candidates],
        }


SPLIT_FLAGS = ("--threads", "--kv-cache-memory-gb")
"""Engine flags `serve --replicas N` splits evenly between the replicas (a total): a variant's are per replica."""


def serve_command(variant: Variant, replicas: int, max_num_seqs: int, router: str, slo: tuple[float, float]) -> str:
    """The command line that runs `replicas` replicas like the variant's on one machine (its threads and KV budget
    times the replicas, which serve splits back)."""
    flags = list(variant.serve_flags)
    for i, flag in enumerate(flags[:-1]):
        if flag in SPLIT_FLAGS and replicas > 1:
            flags[i + 1] = f"{float(flags[i + 1]) * replicas:g}"
    parts = ["tokenfab serve", *flags, f"--max-num-seqs {max_num_seqs}"]
    if replicas > 1:
        parts += [f"--replicas {replicas}", f"--router {router}", f"--slo-ttft {slo[0]:g}", f"--slo-tpot {slo[1]:g}"]
    return " ".join(parts)


def evaluate(
    load: SimLoad, variant: Variant, replicas: int, max_num_seqs: int, router: str = "kv", attainment: float = 0.9
) -> Candidate:
    """Run `load` on `replicas` replicas of `variant` at a batch limit and price the result."""
    c = load.config
    shape = ReplicaShape(
        variant.shape.windows,
        variant.shape.blocks_per_group,
        variant.shape.block_size,
        max_num_seqs,
        variant.shape.max_num_batched_tokens,
        variant.shape.max_model_len,
        variant.usd_per_hour,
    )
    policy = make_policy(router, slo_ttft=c.slo.ttft_s, slo_tpot=c.slo.tpot_s)
    price = variant.usd_per_hour * replicas
    summary, sim = run_load(load, variant.cost, shape, replicas, policy, price)
    # What the deployment costs while it serves the load: its price over the simulated span.
    out_tokens = summary.output_tokens
    usd = price * sim.now / 3600
    per_mtok = usd / out_tokens * 1e6 if out_tokens else None
    good = summary.goodput_fraction or 0.0
    return Candidate(
        variant.name,
        replicas,
        max_num_seqs,
        price,
        variant.modelled,
        good >= attainment and summary.completed == summary.sent,
        good,
        per_mtok,
        summary.output_tok_s,
        summary.ttft_s.get("p50"),
        summary.ttft_s.get("p90"),
        summary.tpot_s.get("p50"),
        summary.completed,
        serve_command(variant, replicas, max_num_seqs, router, (c.slo.ttft_s, c.slo.tpot_s)),
    )


def search(
    load: SimLoad,
    variants: Sequence[Variant],
    max_replicas: int = 8,
    router: str = "kv",
    attainment: float = 0.9,
    progress: Callable[[Candidate], None] | None = None,
) -> Plan:
    """Every variant x batch limit x replica count (1..max_replicas), cheapest SLO-meeting candidate first."""
    if max_replicas < 1:
        raise ValueError("max_replicas must be >= 1")
    out: list[Candidate] = []
    for v in variants:
        for limit in v.batch_limits or (v.shape.max_num_seqs,):
            met_at = None
            for k in range(1, max_replicas + 1):
                cand = evaluate(load, v, k, limit, router, attainment)
                out.append(cand)
                if progress is not None:
                    progress(cand)
                if cand.meets_slo and met_at is None:
                    met_at = k
                if met_at is not None and load.open_loop and k > met_at:
                    break
    return choose(out)


def choose(candidates: list[Candidate], runners_up: int = 3) -> Plan:
    """The cheapest candidate meeting the SLO, the next cheapest other deployments, and the cost/TTFT frontier
    (one entry per variant and replica count: batch limits that change nothing are not listed twice)."""
    meeting = distinct(sorted((c for c in candidates if c.meets_slo), key=lambda c: c.sort_key))
    priced = [c for c in candidates if c.usd_per_mtok_output is not None and c.ttft_p90_s is not None]
    front = pareto_front([(-c.usd_per_mtok_output, -c.ttft_p90_s) for c in priced])  # type: ignore[operator]
    frontier = distinct(sorted((priced[i] for i in front), key=lambda c: c.sort_key))
    best = meeting[0] if meeting else None
    return Plan(best, meeting[1 : 1 + runners_up], frontier, candidates)


def distinct(candidates: list[Candidate]) -> list[Candidate]:
    """The first candidate of each (variant, replicas)."""
    seen: set[tuple[str, int]] = set()
    out = []
    for c in candidates:
        if (c.variant, c.replicas) not in seen:
            seen.add((c.variant, c.replicas))
            out.append(c)
    return out
