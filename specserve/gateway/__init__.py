"""The OpenAI-compatible HTTP gateway in front of the orchestrator, with metrics and a page."""
