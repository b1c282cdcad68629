"""``DomainBandit``: the ODM-style domain bandit baseline as a Composer algorithm."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

from streaming_mads.console.bandit import BanditConsole
from streaming_mads.selection.dataset import MADSDataset
from streaming_mads.influence.influence import PerSampleLoss, causal_lm_per_sample_loss

from streaming_mads.algorithms.agent_console import AgentConsole

__all__ = ['DomainBandit']


class DomainBandit(AgentConsole):
    """Online data mixing by an EXP3 bandit over domains, rewarded by training loss.

    The same schedule, probes, board and checkpointing as :class:`AgentConsole` (so it is a fair,
    cheap baseline for MADS), with :class:`streaming_mads.console.bandit.BanditConsole`'s rule instead of
    influence: no reference set, one forward pass over the probes per update. Use it with a
    ``MADSDataset`` whose agents include ``agent`` and ``temperature: 1``.

    Args:
        update_interval (int): ``W``, batches per version. Defaults to ``150``.
        lead (int, optional): ``L``; ``None`` = prefetch depth + 1. Defaults to ``None``.
        probe_size (int): Probe samples per update over all ranks. Defaults to ``64``.
        probe_pool (int): Most candidates the probe set is drawn from. Defaults to ``4096``.
        agent (str): The dataset agent whose values are the arms. Defaults to ``'domain'``.
        decay (float): ``α`` of the reward moving average. Defaults to ``0.9``.
        seed (int): Probe seed. Defaults to ``0``.
        loss_fn (PerSampleLoss, optional): Per-sample loss adapter. Defaults to the causal-LM one.
        collate_fn (Callable, optional): Builds a model batch from sample dicts. Defaults to the
            train dataloader's ``collate_fn``.
    """

    def __init__(self,
                 update_interval: int = 150,
                 lead: Optional[int] = None,
                 probe_size: int = 64,
                 probe_pool: int = 4096,
                 agent: str = 'domain',
                 decay: float = 0.9,
                 seed: int = 0,
                 loss_fn: Optional[PerSampleLoss] = None,
                 collate_fn: Optional[Callable[[list], Any]] = None) -> None:
        super().__init__(reference=[], update_interval=update_interval, lead=lead,
                         probe_size=probe_size, probe_pool=probe_pool, seed=seed,
                         loss_fn=loss_fn, collate_fn=collate_fn)
        self.console = BanditConsole(self.config, self._make_batch,
                                     loss_fn or causal_lm_per_sample_loss,
                                     agent=agent, decay=decay)

    def __repr__(self) -> str:
        return f'DomainBandit(update_interval={self.config.update_interval})'

    def _load_reference(self, dataset: MADSDataset) -> Sequence[dict]:
        return []
