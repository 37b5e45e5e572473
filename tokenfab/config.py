"""EngineConfig: the engine's one frozen, validated configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from tokenfab.quant.plan import QuantPlan, build_plan

ENV_VARS = {
    "TOKENFAB_CACHE_DIR": "where the default model is assembled and converted models are kept",
    "TOKENFAB_NUM_THREADS": "torch intra-op threads (default: all cores)",
    "OMP_WAIT_POLICY": "set to PASSIVE on import unless given (spinning workers collapse under contention)",
    "TOKENFAB_DISABLE_CPU_KERNELS": "set to skip building/loading the C++ CPU kernels (torch paths only)",
    "TOKENFAB_API_KEY": "the key `tokenfab serve` requires when --api-key is not given",
    "CXX": "C++ compiler for the CPU kernels (default: g++ or c++ on PATH)",
}


@dataclass(frozen=True, slots=True)
class PricingConfig:
    """What a device-second and a joule cost; unset fields come from the price catalogue."""

    profile: str | None = field(default=None, metadata={"flag": "--device-profile"})
    """Device profile in the catalogue (cpu, h100, h200, a100, l4); None picks one from the device."""
    usd_per_hour: float | None = None
    """Device price per hour (per core for cpu)."""
    usd_per_kwh: float | None = None
    """Electricity price."""
    idle_watts: float | None = None
    """Device power when idle."""
    peak_watts: float | None = None
    """Device power when fully busy."""
    prices_file: str | None = None
    """TOML or JSON file with the same keys (and extra profiles); flags win over it."""


SPECULATIVE_METHODS = ("none", "ngram", "draft", "mtp")


def _weight_formats() -> tuple[str, ...]:
    from tokenfab.quant import WEIGHT_FORMATS

    return tuple(WEIGHT_FORMATS)


def _attention_backends() -> tuple[str, ...]:
    from tokenfab.attention import BACKENDS

    return tuple(BACKENDS)


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """Speculative decoding: who proposes draft tokens and how many the target model verifies per step."""

    method: str = "none"
    """none | ngram (prompt lookup) | draft (a smaller model, same tokenizer) | mtp (the checkpoint's MTP modules)."""
    draft_model: str | None = None
    """HF directory or .gguf of the draft model (method draft only)."""
    num_speculative_tokens: int = 4
    """Most draft tokens per request and step (k); the adaptive policy picks 0..k."""
    ngram_min: int = 2
    """Shortest suffix the n-gram proposer looks up in the request's history."""
    ngram_max: int = 4
    """Longest suffix looked up (longer matches are tried first)."""
    adaptive: bool = True
    """Choose k per request and step from measured acceptance and step cost (see tokenfab/engine/speculative/policy.py);
    off: always propose k tokens."""

    def __post_init__(self) -> None:
        checks = [
            (
                self.method in SPECULATIVE_METHODS,
                f"unknown speculative method {self.method!r}; choose one of {', '.join(SPECULATIVE_METHODS)}",
            ),
            (
                (self.method == "draft") == (self.draft_model is not None),
                "a draft model is given with method draft, and only then (draft:<model>)",
            ),
            (1 <= self.num_speculative_tokens <= 16, "num_speculative_tokens must be in 1..16"),
            (1 <= self.ngram_min <= self.ngram_max <= 32, "need 1 <= ngram_min <= ngram_max <= 32"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def enabled(self) -> bool:
        return self.method != "none"

    @classmethod
    def parse(cls, spec: str | None, **options) -> SpeculativeConfig:
        """From the command-line form: none | ngram | mtp | draft:<model path>."""
        spec = (spec or "none").strip()
        method, _, model = spec.partition(":")
        if method == "draft" and not model:
            raise ValueError("--speculative draft needs a model: draft:<HF directory or .gguf>")
        if model and method != "draft":
            raise ValueError(f"unknown speculative method {spec!r}; choose none, ngram, mtp or draft:<model>")
        return cls(method=method, draft_model=model or None, **options)


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """How to build and run one engine."""

    model: str | None = None
    """HF directory or .gguf file; None serves the embedded default (Gemma 3 270M)."""
    dtype: str = field(default="auto", metadata={"choices": lambda: ("auto", "float32", "bfloat16", "float16")})
    """auto | float32 | bfloat16 | float16; auto picks bfloat16 where the hardware computes it fast, else float32.
    On CPU, bfloat16 means bf16 weights with fp32 activations on tokenfab's kernels (fp32 FMA, or AMX tiles or
    vdpbf16ps over x split into two bf16 terms on the amx and avx512_bf16 levels; see batch_invariant)."""
    batch_invariant: bool = True
    """A request's greedy tokens and seeded samples never depend on what else is batched: on CPU every linear layer
    runs tokenfab's kernels, which sum each output in one order at every batch size. False lets a CPU with native bf16
    run torch's bf16 matmuls (bf16 activations, rounded once; faster large batches on AMX, batch-dependent)."""
    device: str = "cpu"
    """cpu, cuda or cuda:N."""
    max_model_len: int = 4096
    """Longest prompt + output; capped by the model's own limit."""
    block_size: int = 16
    """Tokens per KV block."""
    kv_cache_memory_gb: float = 2.0
    """KV cache budget across all layers."""
    max_num_seqs: int = 64
    """Requests running at once."""
    max_num_batched_tokens: int = 512
    """Token budget of one step (prefill chunks + decodes)."""
    enable_prefix_caching: bool = True
    """Reuse the KV blocks of earlier requests that share a prompt prefix."""
    attention_backend: str = field(default="torch", metadata={"choices": _attention_backends})
    """Attention implementation (tokenfab.attention)."""
    seed: int = 0
    """Seed of the engine's generator (requests without their own seed)."""
    num_threads: int | None = field(default=None, metadata={"flag": "--threads"})
    """CPU threads of the model (default: TOKENFAB_NUM_THREADS, else every core)."""
    pack_weights: bool = True
    """Give linear weights to a storage format (oneDNN-packed on CPU, or `quantization`); False keeps plain
    torch weights (a reference path for tests)."""
    quantization: str = field(default="none", metadata={"choices": _weight_formats})
    """Weight format of the linear layers (tokenfab.quant.WEIGHT_FORMATS), quantized at load from the float
    weights; none keeps the model dtype (a pre-quantized checkpoint's layers keep their own format); gguf keeps a
    .gguf model's own quantized blocks packed (model None: the default model's GGUF rather than its fp32 copy)."""
    quantization_exclude: tuple[str, ...] | None = field(default=None, metadata={"metavar": "GLOB"})
    """Layer-name globs kept unquantized; None takes the format's measured defaults (tokenfab.quant.plan)."""
    quantization_overrides: tuple[str, ...] = field(
        default=(), metadata={"flag": "--quantization-override", "metavar": "GLOB=FORMAT"}
    )
    """`PATTERN=FORMAT` rules, e.g. `lm_head=int8`; checked before the exclusions."""
    quantization_method: str = field(default="rtn", metadata={"choices": lambda: ("rtn", "gptq")})
    """rtn (round to nearest) or gptq (error-compensated on shipped calibration text; int4/nvfp4 layers)."""
    kv_host_gb: float = 0.0
    """Host-memory KV tier in GiB (0: off): cached blocks the engine's pool evicts are kept here and loaded back on
    a prefix hit when that is predicted faster than recomputing them."""
    kv_disk_dir: str | None = None
    """Directory of the disk KV tier (None: off): blocks the host tier drops (or the pool evicts, without one) are
    written here as checksummed files per model, and found again after a restart."""
    kv_disk_gb: float = 16.0
    """Disk KV tier budget in GiB (least recently used files go first)."""
    kv_write_through_hits: int = 0
    """With KV tiers: also copy a pool block to the first tier once it has been hit this many times (0: only
    write-back, when the pool evicts it)."""
    kv_events_endpoint: str | None = None
    """ZeroMQ address to publish KV cache events on (vLLM's wire format), e.g. `tcp://*:5557`; None: off."""
    kv_events_replay_endpoint: str | None = None
    """ROUTER address a subscriber asks for missed event batches, e.g. `tcp://*:5558`; None: no replay."""
    kv_events_topic: str = "kv-events"
    """Topic frame of every KV event message."""
    kv_transport: str | None = field(default=None, metadata={"choices": lambda: ("shm", "tcp", "nixl")})
    """Move KV blocks to and from other replicas for prefill/decode splits: shm (shared memory, one host), tcp
    (ZeroMQ, any hosts) or nixl (NVIDIA NIXL over UCX, any hosts; the `nixl` extra); None: off. A replica with a
    transport holds a prefill leg's blocks for its decode replica and pulls a decode leg's blocks from its prefill
    replica."""
    kv_transfer_timeout_s: float = 30.0
    """How long a finished prefill leg's blocks wait for a decode replica to pull and release them."""
    kv_transfer_host: str = "127.0.0.1"
    """Interface the tcp KV transport's server binds (the address decode replicas reach it at); 0.0.0.0: every
    interface, reached at this host's address."""
    data_parallel_size: int = 1
    """Engine processes (ranks) behind one front end, each with its own requests and KV cache (attention
    data-parallel); the threads and KV memory are split between them. With expert_parallel, a mixture-of-experts
    model's experts are split between them too."""
    expert_parallel: bool = False
    """Shard each MoE layer's experts over the data-parallel ranks (torch.distributed, gloo on CPU): tokens go to
    their experts' ranks and back (all-to-all), the ranks step together."""
    eplb: bool = False
    """With expert_parallel: rebalance the experts over the ranks from the measured load every
    eplb_interval_steps steps, without stopping service (hot experts get the redundant copies)."""
    num_redundant_experts: int = 0
    """Extra expert copies over all ranks (experts + these must be a multiple of the ranks); EPLB gives them to
    the hottest experts."""
    eplb_interval_steps: int = 100
    """Steps of the group between two rebalancings."""
    expert_parallel_rank: int = 0
    """This engine's rank in the expert-parallel group (set by the front end that starts the ranks)."""
    expert_parallel_master: str | None = None
    """host:port of rank 0's rendezvous (set by the front end that starts the ranks)."""
    pricing: PricingConfig = PricingConfig()
    speculative: SpeculativeConfig = SpeculativeConfig()

    def __post_init__(self) -> None:
        checks = [
            (
                self.kv_events_replay_endpoint is None or self.kv_events_endpoint is not None,
                "kv_events_replay_endpoint needs kv_events_endpoint",
            ),
            (isinstance(self.speculative, SpeculativeConfig), "speculative must be a SpeculativeConfig"),
            (self.dtype in ("auto", "float32", "bfloat16", "float16"), f"unknown dtype {self.dtype!r}"),
            (self.block_size in (8, 16, 32, 64, 128), "block_size must be one of 8, 16, 32, 64, 128"),
            (self.max_model_len >= 16, "max_model_len must be >= 16"),
            (self.kv_cache_memory_gb > 0, "kv_cache_memory_gb must be > 0"),
            (self.kv_host_gb >= 0 and self.kv_disk_gb > 0, "kv_host_gb must be >= 0 and kv_disk_gb > 0"),
            (self.kv_write_through_hits >= 0, "kv_write_through_hits must be >= 0"),
            (
                self.kv_transport in (None, "shm", "tcp", "nixl"),
                f"unknown kv_transport {self.kv_transport!r}: shm, tcp or nixl",
            ),
            (self.kv_transfer_timeout_s > 0, "kv_transfer_timeout_s must be > 0"),
            (
                self.kv_transport is None or self.enable_prefix_caching,
                "a KV transport moves prefix-cache blocks: it needs enable_prefix_caching",
            ),
            (
                not self.kv_tiers or self.speculative.method != "mtp",
                "KV tiers do not keep the MTP modules' KV yet: use --speculative ngram or draft with them",
            ),
            (self.data_parallel_size >= 1, "data_parallel_size must be >= 1"),
            (not self.eplb or self.expert_parallel, "eplb balances experts over ranks: it needs expert_parallel"),
            (
                self.num_redundant_experts >= 0 and self.eplb_interval_steps >= 1,
                "num_redundant_experts must be >= 0 and eplb_interval_steps >= 1",
            ),
            (
                not (self.expert_parallel and self.data_parallel_size > 1) or self.speculative.method == "none",
                "speculative decoding does not run under expert parallelism yet",
            ),
            (self.max_num_seqs >= 1, "max_num_seqs must be >= 1"),
            (self.max_num_batched_tokens >= self.block_size, "max_num_batched_tokens must be >= block_size"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        # Lists from Python callers become tuples, so the config stays hashable and frozen.
        if self.quantization_exclude is not None:
            object.__setattr__(self, "quantization_exclude", tuple(self.quantization_exclude))
        object.__setattr__(self, "quantization_overrides", tuple(self.quantization_overrides))
        plan = self.quant_plan  # validates format names and override syntax
        if not self.pack_weights and (plan.default != "none" or plan.rules):
            raise ValueError("quantization needs pack_weights=True")

    @property
    def expert_ranks(self) -> bool:
        """Whether this engine is one rank of an expert-parallel group."""
        return self.expert_parallel and self.data_parallel_size > 1

    @property
    def kv_tiers(self) -> bool:
        """Whether any KV tier below the engine's pool is on."""
        return self.kv_host_gb > 0 or self.kv_disk_dir is not None

    @property
    def quant_plan(self) -> QuantPlan:
        """The weight format of every linear layer."""
        return build_plan(
            self.quantization, self.quantization_exclude, self.quantization_overrides, self.quantization_method
        )

    @property
    def torch_device(self) -> torch.device:
        return torch.device(self.device)

    @property
    def threads(self) -> int:
        return self.num_threads or int(os.environ.get("TOKENFAB_NUM_THREADS", 0)) or len(os.sched_getaffinity(0))

    def resolve_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if self.torch_device.type == "cuda":
            return torch.bfloat16
        return torch.bfloat16 if _cpu_computes_bf16() else torch.float32

    def resolve_weights(self) -> tuple[torch.dtype, QuantPlan | None]:
        """(activation and KV dtype, the linear layers' weight plan or None for plain torch weights).

        bfloat16 on a CPU means bf16 storage with fp32 compute on tokenfab's kernels (batch-invariant, and no slow
        emulated bf16 where the CPU lacks bf16 arithmetic); layers the plan leaves unquantized become bf16. Only
        batch_invariant=False on a CPU with native bf16, or a machine without the kernels, runs torch's bf16."""
        dtype = self.resolve_dtype()
        if not self.pack_weights:
            return dtype, None
        plan = self.quant_plan
        if dtype == torch.bfloat16 and self.torch_device.type == "cpu" and self._cpu_bf16_on_kernels():

            def bf16(fmt: str) -> str:
                return "bf16" if fmt == "none" else fmt

            plan = QuantPlan(bf16(plan.default), tuple((p, bf16(f)) for p, f in plan.rules), plan.method)
            return torch.float32, plan
        return dtype, plan

    def _cpu_bf16_on_kernels(self) -> bool:
        from tokenfab.kernels import cpu as kernels

        native = _cpu_computes_bf16()
        if not kernels.available():
            return not native
        return self.batch_invariant or not native


def _cpu_computes_bf16() -> bool:
    return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
