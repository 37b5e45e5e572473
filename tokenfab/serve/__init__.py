"""The OpenAI-compatible API server: an HTTP front end and an engine core process joined by typed messages."""
