"""tokenfab's own log lines (start-up steps, the kernel path) on stderr, formatted like uvicorn's."""

from __future__ import annotations

import logging


def log_to_stderr(level: str = "info") -> None:
    """Send the `tokenfab` loggers to stderr at `level`, once per process (the server and its engine core)."""
    logger = logging.getLogger("tokenfab")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s:     %(message)s"))
        logger.addHandler(handler)
    logger.setLevel(level.upper())
