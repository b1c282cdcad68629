"""Composer algorithms of streaming-mads."""

from algorithms.agent_console import AgentConsole, find_mads_dataset, load_reference
from algorithms.domain_bandit import DomainBandit

__all__ = ['AgentConsole', 'DomainBandit', 'find_mads_dataset', 'load_reference']
