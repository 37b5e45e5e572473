"""ServerSettings: the HTTP side's frozen configuration (the engine's is EngineConfig)."""

from __future__ import annotations

from dataclasses import dataclass


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

    def __post_init__(self) -> None:
        checks = [
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
