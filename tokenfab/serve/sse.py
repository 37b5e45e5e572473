"""Server-sent events: the `data: ...` framing OpenAI streams use, and the in-stream error event."""

from __future__ import annotations

import json

from tokenfab.serve.errors import APIError

DONE = "data: [DONE]\n\n"


def event(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False, separators=(',', ':'))}\n\n"


def error_event(error: APIError) -> str:
    """Once a stream has started its status is 200; a later failure travels as an error event, then [DONE]."""
    return event(error.body())
