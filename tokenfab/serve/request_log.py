"""RequestLog: one JSON line per finished API request — who asked (`user`), what it used, what it cost.

This is the per-user cost ledger: summing `cost.usd` by `user` bills each caller for its share of the device.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TextIO

from tokenfab.engine.types import RequestOutput


class RequestLog:
    def __init__(self, path: str | Path) -> None:
        self._file: TextIO = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives with the server

    def write(self, request_id: str, user: str | None, status: str, outputs: list[RequestOutput],
              energy_source: str, seconds: float) -> None:
        usd = joules = device = 0.0
        for o in outputs:
            if o.cost is not None:
                usd, joules, device = usd + o.cost.usd, joules + o.cost.joules, device + o.cost.device_seconds
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "id": request_id, "user": user, "status": status,
            "prompt_tokens": sum(len(o.prompt_token_ids) for o in outputs),
            "completion_tokens": sum(len(c.token_ids) for o in outputs for c in o.outputs),
            "cached_tokens": sum(o.num_cached_tokens for o in outputs), "e2e_seconds": round(seconds, 6),
            "cost": {"usd": usd, "joules": joules, "device_seconds": device, "energy_source": energy_source},
        }
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()
