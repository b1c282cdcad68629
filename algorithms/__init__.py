"""Composer algorithms of streaming-mads: thin, they decide *when* and wire Composer's state.

The logic is in :mod:`streaming_mads.console`; docs/architecture.md has the long form.
"""

from streaming_mads.algorithms.agent_console import AgentConsole
from streaming_mads.algorithms.domain_bandit import DomainBandit

#: The algorithms by their YAML name (``algorithms: {NAME: {...}}``), as llm-foundry registers them.
ALGORITHMS = {'mads_console': AgentConsole, 'domain_bandit': DomainBandit}

__all__ = ['AgentConsole', 'DomainBandit', 'ALGORITHMS']
