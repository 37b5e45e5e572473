"""Start `tokenfab serve` in a subprocess on a free port and wait until it is healthy."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tokenfab.bench.launch import free_port


class LiveServer:
    def __init__(self, model: Path | None, *args: str, startup_timeout: float = 180.0) -> None:
        """model None serves the embedded default (Gemma 3 270M) under its default name."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "tokenfab.cli", "serve", "--port", str(self.port), *args]
        if model is not None:
            cmd += ["--model", str(model), "--served-model-name", "tiny", "--threads", "1", "--kv-cache-memory-gb",
                    "0.05"]
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"tokenfab-server-{self.port}.log", "w+")
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"server did not become healthy:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def metrics(self) -> dict[str, float]:
        """Unlabelled view of /metrics: name -> value (the first series of each name)."""
        values: dict[str, float] = {}
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                values.setdefault(name.split("{")[0], float(value))
                values[name] = float(value)
        return values

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return self.proc.returncode
