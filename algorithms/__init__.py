"""Composer algorithms of streaming-mads."""

from algorithms.agent_console import AgentConsole, find_mads_dataset, load_reference

__all__ = ['AgentConsole', 'find_mads_dataset', 'load_reference']
