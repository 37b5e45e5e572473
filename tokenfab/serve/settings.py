"""ServerSettings: the HTTP side's frozen configuration (the engine's is EngineConfig)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from tokenfab.cluster.autoscaler import AutoscaleOptions
from tokenfab.cluster.policies import POLICIES, parse_replica_prices
from tokenfab.serve.tools import PARSERS

API_KEY_ENV = "TOKENFAB_API_KEY"


def replica_count(value: str) -> int | str:
    """--replicas: a count >= 1, or auto."""
    if value.strip().lower() == "auto":
        return "auto"
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"--replicas {value!r}: a number of replicas or auto") from None


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8000
    served_model_name: str = "gemma-3-270m"
    """The id clients pass as `model` (None/omitted also selects it)."""
    max_queued_requests: int = 256
    """Waiting requests admitted beyond what the engine runs at once; more get 429."""
    max_queued_tokens: int = 262_144
    """Prompt tokens (x n) of all admitted, unfinished requests; more get 429."""
    request_timeout: float = 600.0
    """Seconds a request may take end to end before it is aborted."""
    graceful_shutdown_timeout: float = 30.0
    """After SIGTERM, how long in-flight requests may take to finish before they are aborted."""
    request_log: str | None = None
    """JSONL file: one line per finished request with its user, tokens, latency and cost."""
    engine_transport: str = "ipc"
    """How the server reaches its engine core: ipc, tcp (loopback), tcp://HOST:PORT (binds PORT and PORT+1 on
    HOST), or inproc (the core on a thread of the server's process)."""
    external_core: bool = False
    """Wait for a core started elsewhere (`tokenfab core --connect tcp://HOST:PORT`) instead of spawning one."""
    api_key: str | None = field(default=None, metadata={"metavar": "KEY"})
    """Require 'Authorization: Bearer KEY' on every route but /health and /ready (default: $TOKENFAB_API_KEY)."""
    allowed_hosts: tuple[str, ...] = field(default=(), metadata={"metavar": "HOST"})
    """Host header names served ('*': any). Default: loopback names when bound to loopback, else any."""
    allowed_origins: tuple[str, ...] = field(default=(), metadata={"metavar": "ORIGIN"})
    """Browser origins allowed to call, with CORS headers ('*': any). Default: same-origin only."""
    enable_docs: bool = False
    """Serve the OpenAPI schema and its pages (/openapi.json, /docs)."""
    max_body_mb: float = 8.0
    """Largest request body in MiB; bigger ones get 413 before they are read."""
    large_body_mb_per_s: float = 4.0
    """MiB per second of request bodies beyond their first 64 KiB that one client address may send; more get 429."""
    body_timeout: float = 30.0
    """Seconds a request body may take to arrive (408 after)."""
    header_timeout: float = 60.0
    """Seconds (up to 1.5x, spread) a connection may wait without a complete request head (just opened or between
    requests); past --max-connections the longest-idle connection is closed sooner."""
    max_connections: int = 8192
    """Open client connections; beyond it the longest-idle one is closed (capped below the file limit)."""
    tokenizer_threads: int = 2
    """Threads that validate, template and tokenize requests off the event loop."""
    replicas: int | str = field(default=1, metadata={"type": replica_count, "metavar": "N|auto"})
    """Engine cores behind this front end (local processes, threads and KV memory split evenly between them); auto:
    between --min-replicas and --max-replicas, as the load needs to meet --slo-ttft and --slo-tpot (the threads and
    KV memory split over --max-replicas)."""
    min_replicas: int = 1
    """With --replicas auto: replicas kept running however light the load."""
    max_replicas: int = 4
    """With --replicas auto: replicas at most."""
    router: str = field(default="kv", metadata={"choices": lambda: POLICIES})
    """How requests are spread over replicas: kv (exact, from their KV events), prefix (approximate), least-load,
    round-robin."""
    ray: bool = False
    """Run the replicas as Ray actors (the `ray` extra): placed by Ray on any node of the cluster."""
    ray_address: str | None = None
    """The Ray cluster to join (`auto`: the one `ray start` runs here; default: start a local one)."""
    slo_ttft: float | None = None
    """Seconds to first token the kv router aims for (the cheapest replica predicted to meet the SLOs wins) and
    --replicas auto scales to meet."""
    slo_tpot: float | None = None
    """Seconds per output token the kv router aims for (a replica's decode step with the request added) and
    --replicas auto scales to meet."""
    replica_price: tuple[str, ...] = field(default=(), metadata={"metavar": "ID=PRICE"})
    """One replica's price: ID=USD_PER_HOUR (as --usd-per-hour: per core on a CPU) or ID=PROFILE (a device profile:
    cpu, h100, ...); replicas not named keep the engine's. With --slo-ttft/--slo-tpot the kv router sends each request
    to the cheapest replica predicted to meet them."""
    prefill_replicas: int = 0
    """Replicas that only compute prompts (prefill/decode disaggregation, with --decode-replicas): a long prompt is
    computed on one and its KV moved (--kv-transport) to the decode replica, when the measured step costs say that
    is sooner or spares the decode replica's running sequences a stall."""
    decode_replicas: int = 0
    """Replicas that generate (with --prefill-replicas); short prompts are computed there too."""
    disaggregation: str = field(default="conditional", metadata={"choices": lambda: ("conditional", "always", "auto")})
    """With prefill replicas: conditional (a prompt goes to a prefill replica when the measured step costs predict
    an earlier first token, or spare the decode replica's running sequences a stall) or always (every prompt of two
    or more uncached blocks). auto, with --replicas N: the replicas serve aggregated and one turns into a prefill
    replica while finished requests miss the TPOT SLO more than the TTFT SLO (and back when the reverse holds)."""
    migration: bool = True
    """With replicas: a request whose replica dies, hangs or is drained continues on another one (off: it fails
    with 503)."""
    max_migrations: int = 3
    """Times one request may move to another replica before it fails."""
    replica_hang_timeout: float = 60.0
    """Seconds an engine core with work may go without finishing a step before it counts as hung: a replica is
    killed (its requests move, it restarts); a single engine makes /health answer 503."""
    step_profile: str | None = None
    """A `tokenfab profile` directory measured with one replica's configuration: each replica's step-cost fit (kv
    routing, --replicas auto) starts from its measured costs instead of defaults, so what a decoding sequence costs
    is known before the replicas' own steps have told it apart from a prompt token (a light load decodes one
    sequence at a time)."""
    tool_call_parser: str = field(default="auto", metadata={"choices": lambda: PARSERS})
    """How tool calls are written and read: auto (from the chat template), hermes or llama3_json."""

    def __post_init__(self) -> None:
        if self.api_key is None and os.environ.get(API_KEY_ENV):
            object.__setattr__(self, "api_key", os.environ[API_KEY_ENV])
        checks = [
            (self.api_key is None or len(self.api_key) > 0, "api_key must not be empty"),
            (self.max_body_mb > 0 and self.large_body_mb_per_s > 0, "max_body_mb and large_body_mb_per_s must be > 0"),
            (self.body_timeout > 0 and self.header_timeout > 0, "body_timeout and header_timeout must be > 0"),
            (self.max_connections >= 1, "max_connections must be >= 1"),
            (self.tokenizer_threads >= 1, "tokenizer_threads must be >= 1"),
            (self.autoscale or (isinstance(self.replicas, int) and self.replicas >= 1), "replicas: N >= 1 or auto"),
            (
                not self.autoscale or (self.slo_ttft is not None and self.slo_tpot is not None),
                "--replicas auto scales to meet an SLO: give --slo-ttft and --slo-tpot",
            ),
            (
                not self.autoscale or 1 <= self.min_replicas <= self.max_replicas >= 2,
                "--replicas auto needs 1 <= --min-replicas <= --max-replicas and --max-replicas >= 2",
            ),
            (self.max_migrations >= 0, "max_migrations must be >= 0"),
            (
                (self.prefill_replicas == 0) == (self.decode_replicas == 0)
                and self.prefill_replicas >= 0
                and self.decode_replicas >= 0,
                "disaggregation needs both --prefill-replicas and --decode-replicas (>= 1 each)",
            ),
            (
                self.disaggregation in ("conditional", "always", "auto"),
                "disaggregation must be conditional, always or auto",
            ),
            (
                self.disaggregation != "auto"
                or (not self.disaggregated and not self.autoscale and int(self.replicas) >= 2),
                "--disaggregation auto switches roles among --replicas N (N >= 2) itself",
            ),
            (
                not self.disaggregated or (self.replicas == 1 and not self.autoscale),
                "--prefill-replicas/--decode-replicas give the replica count: drop --replicas",
            ),
            (all(x is None or x > 0 for x in (self.slo_ttft, self.slo_tpot)), "slo_ttft and slo_tpot must be > 0"),
            (self.replica_hang_timeout > 0, "replica_hang_timeout must be > 0"),
            (
                self.step_profile is None or os.path.isfile(os.path.join(self.step_profile, "step_cost.json")),
                f"--step-profile {self.step_profile}: no step_cost.json there (write one with `tokenfab profile`)",
            ),
            (self.router in POLICIES, f"router must be one of {', '.join(POLICIES)}"),
            (self.replica_slots == 1 or not self.external_core, "external_core serves one replica"),
            (self.replica_slots > 1 or self.ray or not self.replica_price, "replica_price needs --replicas 2 or more"),
            (self.tool_call_parser in PARSERS, f"tool_call_parser must be one of {', '.join(PARSERS)}"),
            (0 < self.port < 65536, "port must be in 1..65535"),
            (self.max_queued_requests >= 0, "max_queued_requests must be >= 0"),
            (self.max_queued_tokens >= 1, "max_queued_tokens must be >= 1"),
            (self.request_timeout > 0, "request_timeout must be > 0"),
            (self.graceful_shutdown_timeout >= 0, "graceful_shutdown_timeout must be >= 0"),
            (bool(self.served_model_name), "served_model_name must not be empty"),
            (
                not self.external_core or self.engine_transport.startswith("tcp://"),
                "external_core needs engine_transport tcp://HOST:PORT",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        parse_replica_prices(self.replica_price, self.replica_slots)

    @property
    def autoscale(self) -> bool:
        return self.replicas == "auto"

    @property
    def disaggregated(self) -> bool:
        """Prefill and decode replicas given."""
        return self.prefill_replicas > 0

    @property
    def moves_kv(self) -> bool:
        """Whether replicas move KV between them (fixed roles, or auto)."""
        return self.disaggregated or self.disaggregation == "auto"

    @property
    def replica_slots(self) -> int:
        """Replicas there can be: --replicas N, --max-replicas with auto, or the prefill and decode replicas."""
        if self.disaggregated:
            return self.prefill_replicas + self.decode_replicas
        return self.max_replicas if self.autoscale else int(self.replicas)

    @property
    def replica_roles(self) -> tuple[str, ...]:
        """Each replica's role (empty: all aggregated)."""
        return ("prefill",) * self.prefill_replicas + ("decode",) * self.decode_replicas

    def autoscale_options(self) -> AutoscaleOptions | None:
        if not self.autoscale:
            return None
        assert self.slo_ttft is not None and self.slo_tpot is not None
        return AutoscaleOptions(self.min_replicas, self.max_replicas, self.slo_ttft, self.slo_tpot)
