"""Scheduler: exact step plans (budget, chunked prefill, admission, priority, preemption, siblings, aborts) and a
randomized workload driven the way the engine drives it, without a model."""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenfab.engine.block_pool import NULL_BLOCK
from tokenfab.engine.kv_cache_manager import KVCacheManager
from tokenfab.engine.scheduler import Scheduler
from tokenfab.engine.types import Request, RequestStatus, SampleResult, SamplingParams, StepPlan

BS = 4


Row = tuple[str, int, int, bool]
"""(request id, start, num_tokens, samples) of one scheduled request, as planned."""


def run_step(sched: Scheduler, token: int, check=None) -> tuple[StepPlan, list[Row]]:
    """One engine step without a model: schedule, then the scheduler's own update with `token` sampled by every
    request whose chunk reached its end (requests finish at max_tokens)."""
    plan = sched.schedule()
    rows = [(s.request.request_id, s.start, s.num_tokens, s.samples) for s in plan.scheduled]
    if check is not None:
        check(plan)
    samplers = [s for s in plan.scheduled if s.samples]
    sched.update(plan, samplers, SampleResult([[token] for _ in samplers], [None] * len(samplers),
                                              [0] * len(samplers)))
    sched.kv.check_integrity()
    return plan, rows


class Sim:
    """A scheduler plus a step counter; step i samples token 1000 + i."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.kv = sched.kv
        self.steps = 0

    def step(self, check=None) -> tuple[StepPlan, list[Row]]:
        result = run_step(self.sched, 1000 + self.steps, check)
        self.steps += 1
        return result

    def rows(self) -> list[Row]:
        return self.step()[1]


def make(rid: str, n: int, max_tokens: int, arrival: float, priority: int = 0, base: int = 0) -> Request:
    return Request(rid, list(range(base, base + n)), SamplingParams(max_tokens=max_tokens), arrival, priority)


def new_sim(blocks: int, max_num_seqs: int, budget: int, windows=(None,), blocks_per_group=None) -> Sim:
    kv = KVCacheManager(list(windows), blocks_per_group or [blocks] * len(windows), BS)
    return Sim(Scheduler(kv, max_num_seqs, budget))


def assert_drained(sim: Sim) -> None:
    assert not sim.sched.has_unfinished()
    assert sim.sched.running == [] and sim.sched.requests == {}
    assert sim.kv.requests == {}
    for pool in sim.kv.pools:
        assert pool.num_free == pool.num_blocks - 1


# -- budget and chunked prefill ----------------------------------------------------------------------------------


def test_chunked_prefill_splits_prompt_by_budget_and_samples_on_the_last_chunk():
    sim = new_sim(blocks=16, max_num_seqs=4, budget=4)
    a = make("a", 10, max_tokens=3, arrival=0.0)
    sim.sched.add(a)
    assert sim.sched.num_waiting == 1 and sim.sched.has_unfinished()
    plans = []
    while sim.sched.has_unfinished():
        plans.append(sim.step())
    assert [rows for _, rows in plans] == [
        [("a", 0, 4, False)],
        [("a", 4, 4, False)],
        [("a", 8, 2, True)],
        [("a", 10, 1, True)],
        [("a", 11, 1, True)],
    ]
    assert [plan.num_batched_tokens for plan, _ in plans] == [4, 4, 2, 1, 1]
    assert a.output_token_ids == [1002, 1003, 1004]
    assert a.status == RequestStatus.FINISHED_LENGTH
    assert a.num_computed_tokens == 12
    assert_drained(sim)


def test_decode_runs_in_the_same_step_as_another_prefill_chunk():
    sim = new_sim(blocks=16, max_num_seqs=4, budget=4)
    a = make("a", 3, max_tokens=3, arrival=0.0)
    b = make("b", 10, max_tokens=2, arrival=1.0, base=100)
    sim.sched.add(a)
    assert sim.rows() == [("a", 0, 3, True)]
    assert sim.kv.block_tables("a") == ([1],)
    sim.sched.add(b)
    plan, rows = sim.step()
    assert rows == [("a", 3, 1, True), ("b", 0, 3, False)]
    assert plan.num_batched_tokens == 4 and plan.preempted == []
    assert sim.kv.block_tables("b") == ([2],)
    assert sim.rows() == [("a", 4, 1, True), ("b", 3, 3, False)]
    assert a.status == RequestStatus.FINISHED_LENGTH and a.output_token_ids == [1000, 1001, 1002]
    assert sim.rows() == [("b", 6, 4, True)]
    assert sim.rows() == [("b", 10, 1, True)]
    assert b.output_token_ids == [1003, 1004]
    assert_drained(sim)


def test_empty_schedule_when_nothing_waits():
    sim = new_sim(blocks=4, max_num_seqs=2, budget=8)
    plan = sim.sched.schedule()
    assert plan.empty and plan.scheduled == [] and plan.preempted == [] and plan.num_batched_tokens == 0


# -- admission order ---------------------------------------------------------------------------------------------


def test_fcfs_admission_fills_the_budget_in_arrival_order():
    sim = new_sim(blocks=32, max_num_seqs=8, budget=8)
    # Added out of order: arrival decides, not the order of add().
    c = make("c", 5, 2, arrival=2.0, base=200)
    a = make("a", 5, 2, arrival=0.0)
    b = make("b", 5, 2, arrival=1.0, base=100)
    for r in (c, a, b):
        sim.sched.add(r)
    assert sim.rows() == [("a", 0, 5, True), ("b", 0, 3, False)]
    assert sim.sched.num_running == 2 and sim.sched.num_waiting == 1
    assert sim.rows() == [("a", 5, 1, True), ("b", 3, 2, True), ("c", 0, 5, True)]
    assert a.finished and not b.finished
    assert sim.rows() == [("b", 5, 1, True), ("c", 5, 1, True)]
    assert_drained(sim)


def test_waiting_queue_is_ordered_by_priority_then_arrival():
    sim = new_sim(blocks=32, max_num_seqs=8, budget=5)
    reqs = [
        make("low", 5, 1, arrival=0.0, priority=2),
        make("mid", 5, 1, arrival=1.0, priority=1),
        make("hi-late", 5, 1, arrival=3.0, priority=0),
        make("hi-early", 5, 1, arrival=2.0, priority=0),
    ]
    for i, r in enumerate(reqs):
        r.prompt_token_ids = [10 * i + t for t in range(5)]
        sim.sched.add(r)
    order = []
    while sim.sched.has_unfinished():
        rows = sim.rows()
        assert len(rows) == 1 and rows[0][1:] == (0, 5, True)
        order.append(rows[0][0])
    assert order == ["hi-early", "hi-late", "mid", "low"]
    assert_drained(sim)


def test_max_num_seqs_caps_running_requests():
    sim = new_sim(blocks=32, max_num_seqs=2, budget=64)
    for i, rid in enumerate("abc"):
        sim.sched.add(make(rid, 4, 2, arrival=float(i), base=10 * i))
    assert sim.rows() == [("a", 0, 4, True), ("b", 0, 4, True)]
    assert sim.sched.num_running == 2 and sim.sched.num_waiting == 1
    # Budget is left over but the sequence slots are full.
    assert sim.rows() == [("a", 4, 1, True), ("b", 4, 1, True)]
    assert sim.sched.num_running == 0 and sim.sched.num_waiting == 1
    assert sim.rows() == [("c", 0, 4, True)]
    assert sim.rows() == [("c", 4, 1, True)]
    assert_drained(sim)


# -- preemption ----------------------------------------------------------------------------------------------------


def test_preemption_recomputes_the_latest_request_when_blocks_run_out():
    sim = new_sim(blocks=5, max_num_seqs=8, budget=16)  # 4 usable blocks
    a = make("a", 7, 4, arrival=0.0)
    b = make("b", 7, 4, arrival=1.0, base=100)
    sim.sched.add(a)
    sim.sched.add(b)
    assert sim.rows() == [("a", 0, 7, True), ("b", 0, 7, True)]
    assert sim.kv.block_tables("a") == ([1, 2],) and sim.kv.block_tables("b") == ([3, 4],)
    assert sim.rows() == [("a", 7, 1, True), ("b", 7, 1, True)]
    assert sim.kv.num_free_blocks() == [0]

    # a's 9th token needs a third block: b (same priority, later arrival) is preempted and its blocks freed.
    plan, rows = sim.step()
    assert rows == [("a", 8, 1, True)]
    assert plan.preempted == [b]
    assert b.status == RequestStatus.PREEMPTED
    assert b.num_computed_tokens == 0
    assert b.num_preemptions == 1 and a.num_preemptions == 0
    assert sim.sched.num_preemptions == 1
    assert "b" not in sim.kv.requests
    assert b not in sim.sched.running and sim.sched.num_waiting == 1
    assert b.output_token_ids == [1000, 1001]  # generated tokens are kept and recomputed
    # b's tail block (id 4) went to a; its first block (id 3) is free and still cached.
    assert sim.kv.block_tables("a") == ([1, 2, 4],)
    assert list(sim.kv.pools[0].free) == [3]
    assert sim.kv.pools[0].blocks[4].ref_count == 1

    # b cannot come back while a holds the blocks; a finishes.
    assert sim.rows() == [("a", 9, 1, True)]
    assert a.status == RequestStatus.FINISHED_LENGTH and a.num_output_tokens == 4
    assert b.status == RequestStatus.PREEMPTED and "b" not in sim.kv.requests
    # b is readmitted with a hit on its surviving first block and recomputes the rest, outputs included.
    assert sim.rows() == [("b", 4, 5, True)]
    assert b.num_cached_tokens == 4
    assert b.status == RequestStatus.RUNNING
    assert sim.rows() == [("b", 9, 1, True)]
    assert b.status == RequestStatus.FINISHED_LENGTH
    assert b.output_token_ids == [1000, 1001, 1004, 1005]
    assert sim.sched.num_preemptions == 1
    assert_drained(sim)


def test_preemption_victim_is_the_lowest_priority_unscheduled_request():
    sim = new_sim(blocks=7, max_num_seqs=8, budget=32)  # 6 usable blocks
    a = make("a", 7, 8, arrival=0.0, priority=0)
    c = make("c", 7, 8, arrival=1.0, priority=2, base=100)
    b = make("b", 7, 8, arrival=2.0, priority=1, base=200)
    sim.sched.add(a)
    sim.sched.add(c)
    assert sim.rows() == [("a", 0, 7, True), ("c", 0, 7, True)]
    sim.sched.add(b)
    assert sim.rows() == [("a", 7, 1, True), ("c", 7, 1, True), ("b", 0, 7, True)]
    assert sim.sched.running == [a, c, b]
    assert sim.kv.num_free_blocks() == [0]
    # a needs a block: c (priority 2) goes, although b is later both in arrival and in the running list.
    plan, rows = sim.step()
    assert plan.preempted == [c]
    assert rows == [("a", 8, 1, True), ("b", 7, 1, True)]
    assert sim.sched.running == [a, b]
    assert c.num_computed_tokens == 0 and c.num_preemptions == 1 and "c" not in sim.kv.requests
    while sim.sched.has_unfinished():
        sim.step()
        assert sim.steps < 100
    for r in (a, b, c):
        assert r.status == RequestStatus.FINISHED_LENGTH and r.num_output_tokens == 8
    assert_drained(sim)


def test_request_that_cannot_grow_preempts_itself_when_it_is_the_lowest_priority():
    sim = new_sim(blocks=5, max_num_seqs=8, budget=32)  # 4 usable blocks
    low = make("low", 7, 3, arrival=0.0, priority=1)
    hi = make("hi", 7, 3, arrival=1.0, priority=0, base=100)
    sim.sched.add(low)
    assert sim.rows() == [("low", 0, 7, True)]
    sim.sched.add(hi)
    assert sim.rows() == [("low", 7, 1, True), ("hi", 0, 7, True)]
    assert sim.sched.running == [low, hi]
    # low needs a third block and is itself the lowest priority: it is preempted, hi still runs this step.
    plan, rows = sim.step()
    assert plan.preempted == [low]
    assert rows == [("hi", 7, 1, True)]
    assert low.status == RequestStatus.PREEMPTED and low.num_computed_tokens == 0 and low.num_preemptions == 1
    assert sim.sched.running == [hi]
    while sim.sched.has_unfinished():
        sim.step()
        assert sim.steps < 50
    assert low.num_output_tokens == 3 and hi.num_output_tokens == 3
    assert_drained(sim)


# -- siblings ------------------------------------------------------------------------------------------------------


def test_sibling_waits_for_the_leader_prompt_then_shares_its_blocks():
    sim = new_sim(blocks=32, max_num_seqs=8, budget=4)
    leader = make("g#0", 10, 3, arrival=0.0)
    sibling = make("g#1", 10, 2, arrival=0.0)
    other = make("x", 3, 1, arrival=1.0, base=100)
    sim.sched.add(leader)
    sim.sched.add(sibling, leader=leader)
    sim.sched.add(other)
    assert sim.rows() == [("g#0", 0, 4, False)]
    assert sibling.status == RequestStatus.WAITING and "g#1" not in sim.kv.requests
    assert sim.rows() == [("g#0", 4, 4, False)]
    # The sibling is passed over (leader has not computed its prompt) but a later request is still admitted.
    assert sim.rows() == [("g#0", 8, 2, True), ("x", 0, 2, False)]
    assert sibling.status == RequestStatus.WAITING and "g#1" not in sim.kv.requests
    # Leader's prompt is computed: the sibling gets the two full blocks from the prefix cache.
    hits_before = sim.kv.stats.hits
    assert sim.rows() == [("g#0", 10, 1, True), ("x", 2, 1, True), ("g#1", 8, 2, True)]
    assert sim.kv.stats.hits - hits_before == 8
    assert sibling.num_cached_tokens == 8
    assert sim.kv.block_tables("g#0") == ([1, 2, 3],)
    assert sim.kv.block_tables("g#1") == ([1, 2, 5],)
    assert [sim.kv.pools[0].blocks[i].ref_count for i in (1, 2, 3, 5)] == [2, 2, 1, 1]
    assert sim.rows() == [("g#0", 11, 1, True), ("g#1", 10, 1, True)]
    assert leader.num_output_tokens == 3 and sibling.num_output_tokens == 2
    assert_drained(sim)


def test_sibling_of_an_aborted_leader_is_not_held_back():
    sim = new_sim(blocks=32, max_num_seqs=8, budget=4)
    leader = make("g#0", 10, 2, arrival=0.0)
    sibling = make("g#1", 10, 2, arrival=0.0)
    sim.sched.add(leader)
    sim.sched.add(sibling, leader=leader)
    assert sim.rows() == [("g#0", 0, 4, False)]
    assert sim.sched.abort("g#0") is leader
    assert leader.status == RequestStatus.FINISHED_ABORTED
    # The aborted leader's computed first block is still in the prefix cache.
    assert sim.rows() == [("g#1", 4, 4, False)]
    assert sibling.num_cached_tokens == 4
    while sim.sched.has_unfinished():
        sim.step()
        assert sim.steps < 20
    assert sibling.num_output_tokens == 2 and leader.num_output_tokens == 0
    assert_drained(sim)


# -- aborts --------------------------------------------------------------------------------------------------------


def test_abort_frees_a_running_request_at_once():
    sim = new_sim(blocks=10, max_num_seqs=1, budget=16)
    a = make("a", 10, 5, arrival=0.0)
    b = make("b", 6, 1, arrival=1.0, base=100)
    sim.sched.add(a)
    sim.sched.add(b)
    assert sim.rows() == [("a", 0, 10, True)]
    assert sim.kv.block_tables("a") == ([1, 2, 3],)
    assert sim.kv.num_free_blocks() == [6]
    assert sim.sched.abort("a") is a
    assert a.status == RequestStatus.FINISHED_ABORTED and a.finished
    assert "a" not in sim.kv.requests and "a" not in sim.sched.requests
    assert a not in sim.sched.running
    assert sim.kv.num_free_blocks() == [9]
    assert sim.sched.abort("a") is None
    assert sim.sched.abort("never-added") is None
    # The freed sequence slot goes to the next request in the very next step.
    assert sim.rows() == [("b", 0, 6, True)]
    assert a.num_output_tokens == 1
    assert_drained(sim)


def test_aborted_waiting_and_preempted_requests_are_never_scheduled():
    sim = new_sim(blocks=5, max_num_seqs=8, budget=16)
    a = make("a", 7, 6, arrival=0.0)
    b = make("b", 7, 6, arrival=1.0, base=100)
    c = make("c", 7, 6, arrival=2.0, base=200)
    for r in (a, b, c):
        sim.sched.add(r)
    assert sim.rows() == [("a", 0, 7, True), ("b", 0, 7, True)]
    assert sim.sched.abort("c") is c
    assert sim.sched.num_waiting == 0  # leaves the queue at once, not at the next schedule()
    sim.step()
    plan, rows = sim.step()
    assert plan.preempted == [b] and rows == [("a", 8, 1, True)]
    assert sim.sched.abort("b") is b
    assert b.status == RequestStatus.FINISHED_ABORTED
    seen = set()
    while sim.sched.has_unfinished():
        seen.update(rid for rid, *_ in sim.rows())
        assert sim.steps < 30
    assert seen == {"a"}
    assert a.num_output_tokens == 6
    assert c.num_output_tokens == 0 and c.status == RequestStatus.FINISHED_ABORTED
    assert_drained(sim)




# -- randomized workload -------------------------------------------------------------------------------------------

WINDOW = 8


@dataclass
class Spec:
    arrive_step: int
    prompt_len: int
    shared: int
    max_tokens: int
    priority: int
    siblings: int


@st.composite
def workloads(draw):
    budget = draw(st.sampled_from([3, 4, 6, 8, 16]))
    max_len = 24
    full_blocks = draw(st.integers(min_value=-(-max_len // BS) + 1, max_value=-(-max_len // BS) + 4))
    # A lone request's largest chunk must fit in the sliding group: the window's blocks plus the chunk's.
    sliding_min = -(-(WINDOW - 1 + budget) // BS) + 2
    sliding_blocks = draw(st.integers(min_value=sliding_min, max_value=sliding_min + 4))
    max_num_seqs = draw(st.integers(min_value=1, max_value=4))
    specs = []
    for _ in range(draw(st.integers(min_value=1, max_value=8))):
        max_tokens = draw(st.integers(min_value=1, max_value=6))
        prompt_len = draw(st.integers(min_value=1, max_value=max_len + 1 - max_tokens))
        specs.append(Spec(
            arrive_step=draw(st.integers(min_value=0, max_value=12)),
            prompt_len=prompt_len,
            shared=draw(st.integers(min_value=0, max_value=prompt_len)),
            max_tokens=max_tokens,
            priority=draw(st.integers(min_value=0, max_value=2)),
            siblings=draw(st.sampled_from([0, 0, 0, 1, 2])),
        ))
    aborts = draw(st.lists(st.tuples(st.integers(min_value=0, max_value=30), st.integers(min_value=0, max_value=20)),
                           max_size=3))
    return budget, full_blocks, sliding_blocks, max_num_seqs, specs, aborts


def _check_plan(sim: Sim, plan: StepPlan, shadow: list[dict[int, list]]) -> None:
    """Plan-level invariants, plus a shadow KV store: every position a scheduled chunk attends to must be in its
    block table, holding the KV of exactly this token sequence; writes only go to unshared blocks."""
    sched, kv = sim.sched, sim.kv
    assert plan.num_batched_tokens == sum(s.num_tokens for s in plan.scheduled) <= sched.max_num_batched_tokens
    ids = [s.request.request_id for s in plan.scheduled]
    assert len(ids) == len(set(ids))
    assert len(sched.running) <= sched.max_num_seqs
    assert set(kv.requests) == {r.request_id for r in sched.running}
    for s in plan.scheduled:
        r = s.request
        assert s.num_tokens >= 1 and s.start == r.num_computed_tokens and s.end <= r.num_tokens
        assert r.status == RequestStatus.RUNNING
        tokens = r.all_token_ids
        for g, (window, table) in enumerate(zip(kv.windows, kv.block_tables(r.request_id))):
            assert len(table) == -(-s.end // BS)
            lo = 0 if window is None else max(0, s.start - window + 1)
            for p in range(lo, s.start):
                block = table[p // BS]
                assert block != NULL_BLOCK, (r.request_id, g, p)
                assert shadow[g].get(block, [None] * BS)[p % BS] == tuple(tokens[: p + 1]), (r.request_id, g, p)
            for p in range(s.start, s.end):
                block = table[p // BS]
                assert block != NULL_BLOCK and kv.pools[g].blocks[block].ref_count == 1, (r.request_id, g, p)
                shadow[g].setdefault(block, [None] * BS)[p % BS] = tuple(tokens[: p + 1])
    for p in plan.preempted:
        assert p.status == RequestStatus.PREEMPTED and p.num_computed_tokens == 0 and p.request_id not in kv.requests


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_randomized_workload_finishes_everything_without_leaks(workload):
    budget, full_blocks, sliding_blocks, max_num_seqs, specs, aborts = workload
    kv = KVCacheManager([None, WINDOW], [full_blocks, sliding_blocks], BS)
    sim = Sim(Scheduler(kv, max_num_seqs, budget))
    shared_prefix = [7000 + i for i in range(24)]
    added: list[Request] = []
    aborted: set[str] = set()
    pending = sorted(enumerate(specs), key=lambda e: e[1].arrive_step)
    shadow: list[dict[int, list]] = [{}, {}]
    arrival = 0
    max_steps = 400

    while pending or sim.sched.has_unfinished():
        while pending and pending[0][1].arrive_step <= sim.steps:
            i, spec = pending.pop(0)
            prompt = shared_prefix[: spec.shared] + [100 * (i + 1) + t for t in range(spec.prompt_len - spec.shared)]
            leader = Request(f"r{i}", prompt, SamplingParams(max_tokens=spec.max_tokens), float(arrival), spec.priority)
            sim.sched.add(leader)
            added.append(leader)
            for k in range(spec.siblings):
                sib = Request(f"r{i}#{k + 1}", list(prompt), SamplingParams(max_tokens=spec.max_tokens),
                              float(arrival), spec.priority)
                sim.sched.add(sib, leader=leader)
                added.append(sib)
            arrival += 1
        for at_step, which in aborts:
            if at_step == sim.steps and added:
                victim = added[which % len(added)]
                if not victim.finished:
                    assert sim.sched.abort(victim.request_id) is victim
                    aborted.add(victim.request_id)
                    assert victim.request_id not in kv.requests
                    kv.check_integrity()
        sim.step(check=lambda plan: _check_plan(sim, plan, shadow))
        assert sim.steps <= max_steps, "workload did not finish: starvation or livelock"

    assert len(added) == sum(1 + s.siblings for s in specs)
    for r in added:
        if r.request_id in aborted:
            assert r.status == RequestStatus.FINISHED_ABORTED
        else:
            assert r.status == RequestStatus.FINISHED_LENGTH, r.request_id
            assert r.num_output_tokens == r.params.max_tokens, r.request_id
            assert r.num_computed_tokens == r.num_tokens - 1
    assert_drained(sim)
    assert sim.sched.leaders == {}
