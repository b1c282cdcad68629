"""Composer algorithms of streaming-mads."""

from streaming_mads.algorithms.agent_console import AgentConsole, find_mads_dataset, load_reference
from streaming_mads.algorithms.domain_bandit import DomainBandit

__all__ = ['AgentConsole', 'DomainBandit', 'find_mads_dataset', 'load_reference']
