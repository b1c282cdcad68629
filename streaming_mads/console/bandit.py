"""An online domain bandit in the style of ODM, on MADS' dataset and board (a baseline).

Online Data Mixing (ODM) treats each domain as an arm of an EXP3 bandit whose reward is the
training loss of the domain's samples: a domain the model still finds hard is sampled more. It
needs no reference set and almost no compute, so it is the cheap alternative a team would weigh
MADS against. Here it runs on exactly MADS' machinery (the same probes from the pools the loader
dealt, the same versioned board and schedule, the same selection inside Streaming), so the two
differ only in the rule that turns measurements into weights:

* every ``W`` batches the console's probe set (stratified over the domains) is scored with a
  forward pass of the live model: each domain's mean loss ``L_k``;
* EXP3 as in ODM: ``R̂_k <- α R̂_k + (1 - α) L_k / π_k`` (importance-weighted, moving average),
  ``ε_t = min(1/K, sqrt(ln K / (K t)))``, ``π = (1 - K ε_t) softmax(ε_{t-1} R̂) + ε_t``;
* the policy is published as the domain agent's memory ``w_k ∝ π_k / p_k`` (``p_k``: the
  domain's share of the data), so at temperature 1 the kept mix follows ``π`` as far as the pool
  ratio allows.

One deviation from ODM: it observes the losses of the domain it just sampled in the training
batch; here every domain is measured on the probes (a little more information, never less).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from streaming_mads.console.config import ConsoleConfig
from streaming_mads.console.console import Console
from streaming_mads.console.metrics import metric_token
from streaming_mads.influence import PerSampleLoss, influence_mode, unwrap_ddp
from streaming_mads.settings import check_number

__all__ = ['exploration_rate', 'exp3_policy', 'exp3_update', 'memory_for_shares', 'BanditConsole']


def exploration_rate(step: int, arms: int) -> float:
    """ODM's ``ε_t = min(1/K, sqrt(ln K / (K t)))`` (``1/K`` before the first update)."""
    if step <= 0 or arms <= 1:
        return 1.0 / max(arms, 1)
    return min(1.0 / arms, math.sqrt(math.log(arms) / (arms * step)))


def exp3_policy(estimates: NDArray, step: int) -> NDArray[np.float64]:
    """``π = (1 - K ε_t) softmax(ε_{t-1} R̂) + ε_t``: EXP3's mix with uniform exploration."""
    r = np.asarray(estimates, np.float64)
    k = len(r)
    logits = exploration_rate(step - 1, k) * r
    soft = np.exp(logits - logits.max())
    eps = exploration_rate(step, k)
    return (1 - k * eps) * soft / soft.sum() + eps


def exp3_update(estimates: NDArray, policy: NDArray, losses: NDArray,
                decay: float) -> NDArray[np.float64]:
    """``R̂_k <- α R̂_k + (1 - α) L_k / π_k`` for the domains measured (``NaN`` loss: kept)."""
    r = np.asarray(estimates, np.float64).copy()
    seen = np.isfinite(losses)
    r[seen] = decay * r[seen] + (1 - decay) * np.asarray(losses)[seen] / np.asarray(policy)[seen]
    return r


def memory_for_shares(policy: NDArray, freq: NDArray) -> NDArray[np.float64]:
    """Memory weights ``∝ π_k / p_k`` (mean 1) that keep each domain at share ``π_k`` at τ = 1."""
    p = np.asarray(freq, np.float64)
    p = p / p.sum()
    w = np.asarray(policy, np.float64) / np.maximum(p, 1e-12)
    return w / w.mean()


def _mean_by_domain(ids: NDArray, losses: NDArray, arms: int) -> NDArray[np.float64]:
    counts = np.bincount(ids, minlength=arms)
    sums = np.bincount(ids, weights=losses, minlength=arms)
    return np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)


class BanditConsole(Console):
    """A :class:`~streaming_mads.console.console.Console` whose update is ODM's EXP3 over one agent.

    Args:
        config (ConsoleConfig): Schedule and probe settings (``update_interval``, ``lead``,
            ``probe_size``, ``probe_pool``, ``seed``; the influence settings are unused).
        make_batch (Callable[[Sequence[dict]], Any]): Collates sample dicts into a model batch.
        loss_fn (PerSampleLoss): Per-sample training loss.
        agent (str): The dataset agent whose values are the arms. Defaults to ``'domain'``.
        decay (float): ``α`` of the reward moving average. Defaults to ``0.9`` (ODM's).
    """

    needs_reference = False

    def __init__(self, config: ConsoleConfig, make_batch: Callable[[Sequence[dict]], Any],
                 loss_fn: PerSampleLoss, agent: str = 'domain', decay: float = 0.9) -> None:
        super().__init__(config, make_batch, loss_fn)
        decay = check_number(decay, 'domain_bandit decay', low=0, high=1, high_open=True,
                             hint='It is the weight of the past in the reward average.')
        if not isinstance(agent, str) or not agent:
            raise TypeError(f'domain_bandit agent={agent!r} is not allowed: it must be the name of '
                            f'one of the dataset\'s agents.')
        self.agent_name, self.decay = agent, decay
        self.estimates: NDArray[np.float64] = np.zeros(0)
        self.steps = 0

    def _arm(self) -> int:
        assert self.dataset is not None
        names = [a.name for a in self.dataset.agents]
        if self.agent_name not in names:
            raise ValueError(f'domain_bandit agent {self.agent_name!r} is not one of the dataset\'s '
                             f'agents {names}: set train_loader.dataset.agents=[{self.agent_name}].')
        return names.index(self.agent_name)

    def attach(self, dataset: Any, depth: int, reference: Sequence[dict],
               batches_per_epoch: Optional[int] = None) -> None:
        self.dataset = dataset
        if not len(self.estimates):
            self.estimates = np.zeros(dataset.agents[self._arm()].num_values)
        super().attach(dataset, depth, reference, batches_per_epoch)

    def measure(self, model: torch.nn.Module, version: int, ids: NDArray[np.int64],
                optimizer: Optional[torch.optim.Optimizer] = None) -> NDArray[np.float64]:
        """This rank's probes' training loss: one forward pass (``optimizer`` is unused)."""
        assert self.dataset is not None
        if not len(ids):
            return np.zeros(0)
        net = unwrap_ddp(model)
        batch = self.make_batch([self.dataset[int(i)] for i in ids])
        with influence_mode(net), torch.no_grad():
            return self.loss_fn(net, batch).detach().double().cpu().numpy()

    def learn(self, version: int, probe_ids: NDArray[np.int64],
              losses: NDArray[np.float64]) -> Optional[NDArray[np.float64]]:
        """EXP3 on the arms' mean probe loss; the new policy ``π``, ``None`` (skipped) when no
        probe was logged or a loss is not finite. Every rank computes it (same inputs)."""
        assert self.dataset is not None
        arm = self._arm()
        agent = self.dataset.agents[arm]
        if not len(probe_ids) or not np.all(np.isfinite(losses)):
            return None
        by_arm = _mean_by_domain(self.dataset.label_ids(probe_ids)[arm], losses, agent.num_values)
        self.estimates = exp3_update(self.estimates, self.policy(), by_arm, self.decay)
        self.steps += 1
        agent.memory = memory_for_shares(self.policy(), agent.freq)
        return self.policy()

    def metrics(self, update: Optional[NDArray], losses: NDArray) -> dict[str, float]:
        """The console's metrics (``mads/reward/*`` are the probes' losses) and the policy."""
        assert self.dataset is not None
        out = super().metrics(None, losses)
        policy = self.policy()
        for k, value in enumerate(self.dataset.agents[self._arm()].value_names):
            out[f'mads/bandit/policy/{metric_token(value)}'] = float(policy[k])
        return out

    def policy(self) -> NDArray[np.float64]:
        """The current sampling policy ``π`` over the arms."""
        return exp3_policy(self.estimates, self.steps + 1)

    def state_dict(self, batches_done: Optional[int] = None) -> dict[str, Any]:
        return {**super().state_dict(batches_done), 'bandit': {
            'estimates': self.estimates.tolist(), 'steps': self.steps}}

    def _restore(self, state: dict[str, Any]) -> None:
        super()._restore(state)
        self.estimates = np.asarray(state['bandit']['estimates'], np.float64)
        self.steps = int(state['bandit']['steps'])
