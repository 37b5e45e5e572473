"""Prometheus metrics in the style of vLLM's `vllm:*`, under `tokenfab:`, on one registry per server.

Per-request latencies (TTFT, inter-token, TPOT, E2E, queue, prefill, decode and inference time) are observed in the
front end as outputs arrive; a request the client abandons finishes with reason `abort`, its cost so far counted.
Engine gauges and counters (running/waiting, KV usage, prefix cache, preemptions, cost and energy totals,
speculative decoding) are read from the core's latest stats when /metrics is scraped, and only while the engine is
alive (`tokenfab:engine_alive` says which): a dead engine's last gauges are not reported as current. The rolling
$/Mtok and J/token gauges cover the last minute of engine activity.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

from msgspec import Struct
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from tokenfab.cluster.router import Router
from tokenfab.engine.stats import EngineStats, MoEStats, SpecStats, exported
from tokenfab.engine.stats import Metric as StatMetric
from tokenfab.engine.types import RequestOutput

LATENCY_BUCKETS = (
    0.001,
    0.005,
    0.01,
    0.02,
    0.04,
    0.06,
    0.08,
    0.1,
    0.25,
    0.5,
    0.75,
    1.0,
    2.5,
    5.0,
    7.5,
    10.0,
    20.0,
    40.0,
    80.0,
    160.0,
    640.0,
)
TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000)
ROLLING_WINDOW_S = 60.0


class ServerMetrics:
    def __init__(
        self, model_name: str, stats: Callable[[], EngineStats | None], alive: Callable[[], bool] = lambda: True
    ) -> None:
        self.registry = CollectorRegistry()
        self.price = Gauge(
            "tokenfab:device_price_usd_per_hour",
            "Price of the device time the engine uses",
            ["model_name"],
            registry=self.registry,
        )
        self.energy_price = Gauge(
            "tokenfab:energy_price_usd_per_kwh", "Electricity price", ["model_name"], registry=self.registry
        )
        labels: dict[str, Any] = {"labelnames": ["model_name"], "registry": self.registry}
        self._model = model_name
        self.finished = Counter(
            "tokenfab:request_success",
            "Finished requests by reason",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "tokenfab:request_rejected",
            "Requests answered with an error status (validation, auth, size, unknown model or route, overload, "
            "timeout, server error)",
            ["model_name", "status"],
            registry=self.registry,
        )
        self.connections_closed = Counter(
            "tokenfab:connections_closed",
            "Client connections closed by a limit (header_timeout, evicted when over the cap, refused)",
            ["model_name", "reason"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter("tokenfab:prompt_tokens", "Prompt tokens of finished requests", **labels)
        self.generation_tokens = Counter(
            "tokenfab:generation_tokens", "Generated tokens of finished requests", **labels
        )
        self.ttft = self._latency("tokenfab:time_to_first_token_seconds", "Time to first token")
        self.itl = self._latency("tokenfab:inter_token_latency_seconds", "Time between output deliveries per token")
        self.tpot = self._latency(
            "tokenfab:request_time_per_output_token_seconds", "Mean time per output token after the first, per request"
        )
        self.e2e = self._latency("tokenfab:e2e_request_latency_seconds", "End-to-end request latency")
        self.queue = self._latency("tokenfab:request_queue_time_seconds", "Time from arrival to first scheduled")
        self.prefill_time = self._latency(
            "tokenfab:request_prefill_time_seconds", "Time from first scheduled to first token"
        )
        self.decode_time = self._latency("tokenfab:request_decode_time_seconds", "Time from first token to finished")
        self.inference_time = self._latency(
            "tokenfab:request_inference_time_seconds", "Time from first scheduled to finished"
        )
        self.iteration_tokens = Histogram(
            "tokenfab:iteration_tokens_total",
            "Tokens run through the model per engine step",
            buckets=TOKEN_BUCKETS,
            **labels,
        )
        self.prompt_len = Histogram("tokenfab:request_prompt_tokens", "Prompt length", buckets=TOKEN_BUCKETS, **labels)
        self.output_len = Histogram(
            "tokenfab:request_generation_tokens", "Generated tokens per request", buckets=TOKEN_BUCKETS, **labels
        )
        self.request_usd = Counter(
            "tokenfab:request_cost_usd", "Sum of usage.cost.usd over finished requests", **labels
        )
        self.request_joules = Counter(
            "tokenfab:request_energy_joules", "Sum of usage.cost.joules over finished requests", **labels
        )
        self._engine = _EngineCollector(model_name, stats, alive)
        self.registry.register(self._engine)
        self._last_step: tuple[int, int] | None = None

    def _latency(self, name: str, doc: str) -> Histogram:
        return Histogram(name, doc, ["model_name"], buckets=LATENCY_BUCKETS, registry=self.registry)

    def observe_finished(self, out: RequestOutput, now: float) -> None:
        m = self._model
        n_out = sum(len(o.token_ids) for o in out.outputs)
        reason = out.outputs[0].finish_reason or "abort"
        self.finished.labels(m, reason).inc()
        self.prompt_tokens.labels(m).inc(len(out.prompt_token_ids))
        self.generation_tokens.labels(m).inc(n_out)
        self.prompt_len.labels(m).observe(len(out.prompt_token_ids))
        self.output_len.labels(m).observe(n_out)
        if out.cost is not None:
            self.request_usd.labels(m).inc(out.cost.usd)
            self.request_joules.labels(m).inc(out.cost.joules)
        t = out.metrics
        if t is None:
            return
        self.e2e.labels(m).observe(now - t.arrival)
        if t.first_scheduled is not None:
            self.queue.labels(m).observe(max(0.0, t.first_scheduled - t.arrival))
            self.inference_time.labels(m).observe(max(0.0, now - t.first_scheduled))
            if t.first_token is not None:
                self.prefill_time.labels(m).observe(max(0.0, t.first_token - t.first_scheduled))
        if t.first_token is not None:
            self.decode_time.labels(m).observe(max(0.0, now - t.first_token))
        longest = max(len(o.token_ids) for o in out.outputs)
        if t.first_token is not None and longest > 1:
            self.tpot.labels(m).observe((now - t.first_token) / (longest - 1))

    def observe_first_token(self, out: RequestOutput) -> None:
        if out.metrics is not None and out.metrics.first_token is not None:
            self.ttft.labels(self._model).observe(out.metrics.first_token - out.metrics.arrival)

    def observe_gap(self, seconds: float, tokens: int) -> None:
        if tokens > 0:
            self.itl.labels(self._model).observe(seconds / tokens)

    def set_prices(self, usd_per_hour: float, usd_per_kwh: float) -> None:
        self.price.labels(self._model).set(usd_per_hour)
        self.energy_price.labels(self._model).set(usd_per_kwh)

    def observe_stats(self, stats: EngineStats) -> None:
        self._engine.remember(stats)
        now = (stats.scheduler.steps, stats.scheduler.tokens_computed)
        if self._last_step is not None and now[0] > self._last_step[0]:
            steps, tokens = now[0] - self._last_step[0], now[1] - self._last_step[1]
            for _ in range(min(steps, 64)):  # one result per step, except when the reader fell behind
                self.iteration_tokens.labels(self._model).observe(tokens / steps)
        self._last_step = now

    def watch_router(self, router: Router) -> None:
        """Export the router's per-replica state and decisions."""
        self.registry.register(_ReplicaCollector(self._model, router))

    def observe_rejected(self, status: int) -> None:
        self.rejected.labels(self._model, str(status)).inc()

    def observe_connection_closed(self, reason: str) -> None:
        self.connections_closed.labels(self._model, reason).inc()


class _ReplicaCollector:
    """Per replica (label `replica`) load, KV use and requests routed, and the router's decisions by reason."""

    def __init__(self, model_name: str, router: Router) -> None:
        self._model = model_name
        self._router = router

    def collect(self) -> Iterator[Metric]:
        rows = self._router.describe()
        for key, kind, doc in (
            ("running", GaugeMetricFamily, "Sequences the router has in flight on the replica"),
            ("kv_usage", GaugeMetricFamily, "Fraction of the replica's KV blocks in use"),
            ("cached_blocks", GaugeMetricFamily, "Blocks the router's KV index holds for the replica"),
            ("routed", CounterMetricFamily, "Sequences routed to the replica"),
        ):
            family = kind(f"tokenfab:replica_{key}", doc, labels=["model_name", "replica"])
            for row in rows:
                family.add_metric([self._model, str(row["id"])], float(row[key]))
            yield family
        decisions = CounterMetricFamily(
            "tokenfab:router_decisions", "Routing decisions by policy and reason", labels=["model_name", "reason"]
        )
        for reason, count in self._router.decisions.items():
            decisions.add_metric([self._model, reason], float(count))
        yield decisions
        ttft = CounterMetricFamily(
            "tokenfab:router_ttft_seconds",
            "Time to first token summed over routed requests: as the kv policy predicted it, and as it came",
            labels=["model_name", "kind"],
        )
        for which, seconds in self._router.ttft_seconds.items():
            ttft.add_metric([self._model, which], seconds)
        yield ttft
        moved = CounterMetricFamily(
            "tokenfab:router_migrations",
            "Sequences moved to another replica by cause (died, hung, drained), and lost ones (cause lost)",
            labels=["model_name", "cause"],
        )
        for cause, count in self._router.migrations.items():
            moved.add_metric([self._model, cause], float(count))
        yield moved
        yield from self._disaggregation()
        restarts = CounterMetricFamily(
            "tokenfab:replica_restarts",
            "Times the replica was started again after it failed",
            labels=["model_name", "replica"],
        )
        up = GaugeMetricFamily(
            "tokenfab:replica_up", "1 while the replica takes work", labels=["model_name", "replica"]
        )
        for row in rows:
            restarts.add_metric([self._model, str(row["id"])], float(row["restarts"]))
            up.add_metric([self._model, str(row["id"])], float(row["state"] == "running"))
        yield restarts
        yield up
        lag = GaugeMetricFamily(
            "tokenfab:router_kv_event_lag_seconds",
            "Age of the replica's last KV event batch when the router's index applied it",
            labels=["model_name", "replica"],
        )
        for row in rows:
            if row["kv_event_lag_s"] is not None:
                lag.add_metric([self._model, str(row["id"])], row["kv_event_lag_s"])
        yield lag
        yield from self._scaling()
        index = GaugeMetricFamily("tokenfab:router_index_blocks", "Blocks in the router's KV index, all replicas")
        index.add_metric([], float(self._router.index.size()))
        yield index
        replayed = CounterMetricFamily(
            "tokenfab:router_kv_events_replayed", "KV event batches missed live and fetched from a replica's replay"
        )
        replayed.add_metric([], float(self._router.index.replayed))
        yield replayed
        resyncs = CounterMetricFamily(
            "tokenfab:router_index_resyncs", "Times a replica's events were lost beyond its replay buffer"
        )
        resyncs.add_metric([], float(self._router.index.resyncs))
        yield resyncs

    def _disaggregation(self) -> Iterator[Metric]:
        """Where prompts were computed, and with --disaggregation auto the role switches."""
        if self._router.disagg is None:
            return
        split = CounterMetricFamily(
            "tokenfab:router_disaggregation",
            "Where requests' prompts were computed: remote (a prefill replica), local (short, or sooner here: the "
            "decode replica), fallback (a prefill leg failed; computed on the decode replica)",
            labels=["model_name", "decision"],
        )
        for decision, count in self._router.disagg.decisions.items():
            split.add_metric([self._model, decision], float(count))
        yield split
        roles = self._router.disagg.roles
        if roles is not None:
            switched = CounterMetricFamily(
                "tokenfab:router_role_switches",
                "--disaggregation auto: switches to one prefill replica (split) and back (aggregated)",
                labels=["model_name", "to"],
            )
            for to, count in roles.switches.items():
                switched.add_metric([self._model, to], float(count))
            yield switched

    def _scaling(self) -> Iterator[Metric]:
        """Replica time paid for, and with an autoscaler its decisions and last predictions."""
        paid = CounterMetricFamily(
            "tokenfab:replica_seconds", "Replica time paid for: seconds over replicas starting, running or draining"
        )
        paid.add_metric([], self._router.replica_seconds())
        yield paid
        scaler = self._router.scaler
        if scaler is None:
            return
        scaled = CounterMetricFamily(
            "tokenfab:autoscaler_decisions", "Replicas the autoscaler started (up) or drained (down), by reason",
            labels=["model_name", "action", "reason"],
        )  # fmt: skip
        for (action, reason), count in scaler.decisions.items():
            scaled.add_metric([self._model, action, reason], float(count))
        yield scaled
        predicted = GaugeMetricFamily(
            "tokenfab:autoscaler_predicted_seconds",
            "TTFT and TPOT the autoscaler last predicted over the replicas there are",
            labels=["model_name", "kind"],
        )
        last = scaler.last
        for which, value in (("ttft", last.ttft), ("tpot", last.tpot)) if last is not None else ():
            if value is not None:
                predicted.add_metric([self._model, which], value)
        yield predicted


class _EngineCollector:
    """Exports the core's latest stats at scrape time, plus rolling cost-per-token gauges."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats | None], alive: Callable[[], bool]) -> None:
        self._model = model_name
        self._stats = stats
        self._alive = alive
        self._history: deque[EngineStats] = deque()

    def remember(self, s: EngineStats) -> None:
        """Keep about one snapshot per second of the last minute for the rolling gauges."""
        if not self._history or s.time - self._history[-1].time >= 1.0:
            self._history.append(s)
        while len(self._history) > 2 and s.time - self._history[0].time > ROLLING_WINDOW_S:
            self._history.popleft()

    def collect(self) -> Iterator[Metric]:
        labels = [self._model]
        alive = self._alive()
        yield _gauge(
            "engine_alive", "1 while the engine core runs, 0 once it has died or stopped", labels, float(alive)
        )
        s = self._stats()
        if s is None:
            return
        parts: list[Struct] = [s.scheduler, s.kv, s.prefix_cache, s.cost]
        if s.spec.method != "none":
            parts.append(s.spec)
        if s.tiers.media:
            parts.append(s.tiers)
        if s.transfer.transport:
            parts.append(s.transfer)
        for part in parts:
            for metric, value in exported(part):
                if alive or metric.kind == "counter":  # a dead engine's gauges would be stale
                    yield _family(metric, labels, value, s.cost.energy_source)
        if not alive:
            return
        yield _gauge(
            "prefix_cache_hit_rate",
            "Prompt tokens found cached / looked up, since start",
            labels,
            s.prefix_cache.hit_rate,
        )
        yield from self._rolling(s, labels)
        if s.spec.method != "none":
            yield from _speculative(s.spec, s.cost.busy_seconds, labels)
        if s.moe.expert_tokens:
            yield from _experts(s.moe, labels)
            if s.moe.rank_tokens:
                yield from (_family(m, labels, v, s.cost.energy_source) for m, v in exported(s.moe))
                yield _gauge(
                    "moe_all_to_all_share",
                    "Time in the experts' all-to-alls (waiting for the other ranks included) / time in the group's "
                    "steps, summed over the ranks, since start",
                    labels,
                    s.moe.exchange_share,
                )

    def _rolling(self, s: EngineStats, labels: list[str]) -> Iterator[Metric]:
        first = self._history[0] if self._history else s
        usd, joules = s.cost.usd - first.cost.usd, s.cost.joules - first.cost.joules
        out_tokens = s.scheduler.generated_tokens - first.scheduler.generated_tokens
        all_tokens = out_tokens + s.scheduler.prompt_tokens_computed - first.scheduler.prompt_tokens_computed
        usd_g = GaugeMetricFamily(
            "tokenfab:usd_per_million_tokens",
            "Rolling $ per million tokens (last minute)",
            labels=["model_name", "tokens"],
        )
        j_g = GaugeMetricFamily(
            "tokenfab:joules_per_token",
            "Rolling joules per token (last minute)",
            labels=["model_name", "tokens", "energy_source"],
        )
        for kind, n in (("output", out_tokens), ("total", all_tokens)):
            usd_g.add_metric([*labels, kind], usd * 1e6 / n if n else 0.0)
            j_g.add_metric([*labels, kind, s.cost.energy_source], joules / n if n else 0.0)
        yield usd_g
        yield j_g


def _family(metric: StatMetric, labels: list[str], value: float, energy_source: str) -> Metric:
    doc = f"{metric.doc} ({energy_source})" if metric.name == "energy_joules" else metric.doc
    family: CounterMetricFamily | GaugeMetricFamily
    if metric.kind == "counter":
        family = CounterMetricFamily(f"tokenfab:{metric.name}", doc, labels=["model_name"])
    else:
        family = GaugeMetricFamily(f"tokenfab:{metric.name}", doc, labels=["model_name"])
    family.add_metric(labels, value)
    return family


def _speculative(spec: SpecStats, busy_seconds: float, labels: list[str]) -> Iterator[Metric]:
    """Ratios read from the speculative decoding counters."""
    yield _gauge(
        "spec_mean_acceptance_length",
        "Tokens emitted per verification (1 + accepted drafts), since start",
        labels,
        spec.mean_acceptance_length,
    )
    yield _gauge(
        "spec_acceptance_rate",
        "Accepted / proposed draft tokens, since start",
        labels,
        spec.accepted_tokens / spec.proposed_tokens if spec.proposed_tokens else 0.0,
    )
    yield _gauge(
        "spec_draft_time_share",
        "Draft time / engine busy time, since start",
        labels,
        spec.draft_seconds / busy_seconds if busy_seconds else 0.0,
    )


def _experts(moe: MoEStats, labels: list[str]) -> Iterator[Metric]:
    """A mixture-of-experts model's load: per expert of each MoE layer, its imbalance, and per rank under expert
    parallelism."""
    tokens = CounterMetricFamily(
        "tokenfab:moe_expert_tokens",
        "Tokens routed to the expert (a token counts once for each of its experts), by MoE layer",
        labels=["model_name", "layer", "expert"],
    )
    for layer, counts in enumerate(moe.expert_tokens):
        for expert, n in enumerate(counts):
            tokens.add_metric([*labels, str(layer), str(expert)], float(n))
    yield tokens
    yield _gauge(
        "moe_expert_imbalance",
        "Max over mean tokens per expert since start, averaged over MoE layers (1 = even)",
        labels,
        moe.imbalance,
    )
    if moe.rank_tokens:
        ranks = CounterMetricFamily(
            "tokenfab:moe_rank_tokens",
            "Token-expert pairs computed by the rank's experts (expert parallelism)",
            labels=["model_name", "rank"],
        )
        for rank, n in enumerate(moe.rank_tokens):
            ranks.add_metric([*labels, str(rank)], float(n))
        yield ranks
        yield _gauge(
            "moe_rank_imbalance",
            "Max over mean token-expert pairs per expert-parallel rank since start (1 = even)",
            labels,
            moe.rank_imbalance,
        )


def _gauge(name: str, doc: str, labels: list[str], value: float) -> GaugeMetricFamily:
    g = GaugeMetricFamily(f"tokenfab:{name}", doc, labels=["model_name"])
    g.add_metric(labels, value)
    return g
