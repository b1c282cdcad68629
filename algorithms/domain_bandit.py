"""``DomainBandit``: the ODM-style domain bandit baseline as a Composer algorithm.

The same *when* and wiring as :class:`AgentConsole` (and so the same schedule, probes, board and
checkpoints: a fair, cheap baseline for MADS), with :mod:`streaming_mads.console.bandit`'s rule.
docs/architecture.md has the long form.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from streaming_mads.algorithms.agent_console import AgentConsole
from streaming_mads.console.bandit import BanditConsole
from streaming_mads.influence import PerSampleLoss, causal_lm_per_sample_loss

__all__ = ['DomainBandit']


class DomainBandit(AgentConsole):
    """Online data mixing by an EXP3 bandit over domains, rewarded by training loss.

    :class:`~streaming_mads.console.bandit.BanditConsole`'s rule instead of influence: no
    reference set, one forward pass over the probes per update. Use it with a ``MADSDataset``
    whose agents include ``agent`` and ``temperature: 1``.

    Args:
        agent (str): The dataset agent whose values are the arms. Defaults to ``'domain'``.
        decay (float): ``α`` of the reward moving average. Defaults to ``0.9``.
        loss_fn (PerSampleLoss, optional): Per-sample loss adapter. Defaults to the causal-LM one.
        collate_fn (Callable, optional): Builds a model batch from sample dicts. Defaults to the
            train dataloader's ``collate_fn``.
        **settings: The schedule and probe fields of
            :class:`~streaming_mads.console.config.ConsoleConfig`, with its defaults:
            ``update_interval``, ``lead``, ``probe_size``, ``probe_pool``, ``seed``; and
            ``history``, the weight-history file, as :class:`AgentConsole`'s.
    """

    section = 'domain_bandit'
    setting_names = ('update_interval', 'lead', 'probe_size', 'probe_pool', 'seed')

    def __init__(self,
                 agent: str = 'domain',
                 decay: float = 0.9,
                 loss_fn: Optional[PerSampleLoss] = None,
                 collate_fn: Optional[Callable[[list], Any]] = None,
                 **settings: Any) -> None:
        super().__init__(reference=[], loss_fn=loss_fn, collate_fn=collate_fn, **settings)
        self.console = BanditConsole(self.config, self._make_batch,
                                     loss_fn or causal_lm_per_sample_loss,
                                     agent=agent, decay=decay)

    def __repr__(self) -> str:
        return f'DomainBandit(update_interval={self.config.update_interval})'
