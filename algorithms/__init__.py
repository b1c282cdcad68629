"""Composer algorithms of streaming-mads (the AgentConsole arrives here)."""

__all__: list[str] = []
