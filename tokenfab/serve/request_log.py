"""RequestLog: one JSON line per finished API request — who asked (`user`), what it used, what it cost.

This is the per-user cost ledger: summing `usage.cost.usd` by `user` bills each caller for its share of the device.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import TextIO


class RequestLog:
    def __init__(self, path: str | Path) -> None:
        self._file: TextIO = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - lives with the server

    def write(
        self, request_id: str, user: str | None, status: str, usage: dict, seconds: float, session: str | None = None
    ) -> None:
        """`usage` is the request's OpenAI usage object (token counts and cost), as its response carries it."""
        record = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "id": request_id,
            "user": user,
            "session": session,
            "status": status,
            "e2e_seconds": round(seconds, 6),
            **usage,
        }
        self._file.write(json.dumps(record, separators=(",", ":")) + "\n")

    def close(self) -> None:
        self._file.close()
