"""The agent console's state and update step, independent of Composer's event loop.

:class:`Console` holds θ, the agents (owned by the :class:`MADSDataset` it drives), the schedule
and the versions published so far. Its :meth:`Console.step` is one update: draw a stratified probe
set, measure each probe's influence on the reference loss with the live model, combine across
ranks, update memories and θ (:mod:`streaming_mads.rewards`) and publish the next version.
``algorithms.AgentConsole`` only decides *when* to call it and wires Composer's state into it.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from streaming_mads.dataset import MADSDataset
from streaming_mads.influence import PerSampleLoss, compute_influence, reference_gradient
from streaming_mads.rewards import Update, stratified_probe, update_weights

__all__ = ['ConsoleConfig', 'Console', 'prefetch_depth']


@dataclass
class ConsoleConfig:
    """Settings of the agent console (every field is a YAML key of ``mads_console``).

    Args:
        update_interval (int): ``W``: batches per weight version. Defaults to ``150`` (the
            console then costs under 5% of a small CPU run's time; see
            ``benchmarks/console_overhead.py``).
        lead (int, optional): ``L``: a version is published ``L`` batches before its first batch;
            must exceed the DataLoader's ``num_workers x prefetch_factor`` and be below ``W``.
            ``None``: that prefetch depth + 1. Defaults to ``None``.
        probe_size (int): Probe samples per update, over all ranks. Defaults to ``64``.
        probe_pool (int): Uniform candidates the probe set is stratified from. Defaults to ``4096``.
        reference_size (int): Reference samples used for ``∇L_R`` at each update, over all ranks.
            Defaults to ``32``.
        lr_memory (float): ``η`` of the agents' memories. Defaults to ``0.5``.
        lr_theta (float): ``η_θ`` of the collaborative weights. Defaults to ``1.0``.
        memory_floor (float): Smallest memory weight relative to the mean. Defaults to ``0.05``.
        memory_cap (float): Largest memory weight relative to the mean. Defaults to ``20``.
        theta_floor (float): Smallest share of θ per agent. Defaults to ``0.05``.
        seed (int): Seed of probe draws (with the version number). Defaults to ``0``.
    """
    update_interval: int = 150
    lead: Optional[int] = None
    probe_size: int = 64
    probe_pool: int = 4096
    reference_size: int = 32
    lr_memory: float = 0.5
    lr_theta: float = 1.0
    memory_floor: float = 0.05
    memory_cap: float = 20.0
    theta_floor: float = 0.05
    seed: int = 0

    def __post_init__(self) -> None:
        if self.update_interval < 1:
            raise ValueError(f'update_interval must be >= 1 batch, got {self.update_interval}.')
        if self.probe_size < 2 or self.reference_size < 1 or self.probe_pool < self.probe_size:
            raise ValueError('Need probe_size >= 2, reference_size >= 1 and probe_pool >= '
                             'probe_size.')
        if self.lr_memory < 0 or self.lr_theta < 0:
            raise ValueError('Learning rates lr_memory and lr_theta must be >= 0.')
        if not 0 < self.memory_floor <= 1 <= self.memory_cap:
            raise ValueError('Need 0 < memory_floor <= 1 <= memory_cap.')


def prefetch_depth(dataloader: Any) -> int:
    """Batches a DataLoader may build ahead of the trainer: ``num_workers x prefetch_factor``."""
    workers = int(getattr(dataloader, 'num_workers', 0) or 0)
    if workers == 0:
        return 0
    return workers * int(getattr(dataloader, 'prefetch_factor', None) or 2)


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _all_gather_interleaved(values: NDArray, total: int) -> NDArray[np.float64]:
    """Rank ``r`` holds items ``r, r + world, ...``; every rank gets all ``total`` in order."""
    rank, world = _world()
    if world == 1:
        return np.asarray(values, np.float64)
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, np.asarray(values, np.float64))
    out = np.empty(total, np.float64)
    for r, part in enumerate(gathered):
        out[r::world] = part
    return out


class Console:
    """θ, the schedule and the version history of one run (one per rank, all identical).

    Args:
        config (ConsoleConfig): Settings.
        make_batch (Callable[[Sequence[dict]], Any]): Collates sample dicts (as the dataset yields
            them) into a model batch on the model's device.
        loss_fn (PerSampleLoss): Per-sample loss adapter for influence.
    """

    def __init__(self, config: ConsoleConfig, make_batch: Callable[[Sequence[dict]], Any],
                 loss_fn: PerSampleLoss) -> None:
        self.config = config
        self.make_batch = make_batch
        self.loss_fn = loss_fn
        self.dataset: Optional[MADSDataset] = None
        self.reference: list[dict] = []
        self.theta: NDArray[np.float64] = np.zeros(0)
        self.lead = 0
        self.latest = -1
        self.skipped = 0
        self.history: dict[int, dict[str, Any]] = {}
        self._pending: Optional[dict[str, Any]] = None
        self._last_counts: Optional[list[NDArray[np.int64]]] = None

    # -- attaching -------------------------------------------------------------------------

    def attach(self, dataset: MADSDataset, depth: int, reference: Sequence[dict]) -> None:
        """Take over ``dataset``'s agents, set the schedule and publish what batch 0 needs.

        Args:
            dataset (MADSDataset): The training dataset (this rank's copy).
            depth (int): The DataLoader's prefetch depth (``num_workers x prefetch_factor``).
            reference (Sequence[dict]): The reference samples (all ranks' share).
        """
        cfg = self.config
        lead = depth + 1 if cfg.lead is None else cfg.lead
        if lead <= depth:
            raise ValueError(f'mads_console lead={lead} must exceed the DataLoader prefetch depth '
                             f'num_workers x prefetch_factor = {depth}: set lead >= {depth + 1}.')
        if lead >= cfg.update_interval:
            raise ValueError(f'mads_console lead={lead} must be below update_interval='
                             f'{cfg.update_interval}: raise update_interval (or lower num_workers '
                             f'x prefetch_factor).')
        if not reference:
            raise ValueError('The mads_console reference set is empty: point `reference` at a '
                             'non-empty dataset.')
        self.dataset, self.lead, self.reference = dataset, lead, list(reference)
        dataset.configure_schedule(cfg.update_interval, lead)
        self.theta = dataset.initial_theta()
        self.latest = -1
        self.history = {}
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None
        else:
            self._publish(0)

    def _publish(self, version: int) -> None:
        assert self.dataset is not None
        memories = [agent.memory.copy() for agent in self.dataset.agents]
        self.dataset.publish(version, self.theta, memories)
        self.history[version] = {'theta': self.theta.copy(), 'memories': memories}
        self.latest = version

    # -- schedule --------------------------------------------------------------------------

    def due(self, batches_done: int) -> Optional[int]:
        """The version to publish now that ``batches_done`` batches are done, if any."""
        nxt = self.latest + 1
        if self.dataset is not None and batches_done >= nxt * self.config.update_interval - self.lead:
            return nxt
        return None

    # -- the update step -------------------------------------------------------------------

    def draw_probe(self, version: int) -> NDArray[np.int64]:
        """Global sample ids of this update's probe set (the same on every rank)."""
        assert self.dataset is not None
        cfg = self.config
        rng = np.random.default_rng((cfg.seed, version))
        n = self.dataset.num_samples
        candidates = rng.permutation(n)[:cfg.probe_pool] if n <= 4 * cfg.probe_pool else \
            np.unique(rng.integers(0, n, 2 * cfg.probe_pool))[:cfg.probe_pool]
        candidates = rng.permutation(candidates)
        labels = self.dataset.label_ids(candidates)
        sizes = [agent.num_values for agent in self.dataset.agents]
        return candidates[stratified_probe(labels, sizes, cfg.probe_size, rng)]

    def step(self, model: torch.nn.Module, version: int) -> tuple[Optional[Update], dict[str, float]]:
        """One update producing ``version``; returns it and the metrics to log.

        Influence: each rank takes every ``world``-th probe and reference sample, the reference
        gradient is averaged across ranks, the rewards are gathered, and every rank applies the
        same deterministic update to the same numbers.
        """
        assert self.dataset is not None
        start = time.perf_counter()
        rank, world = _world()
        probe_ids = self.draw_probe(version)
        mine = probe_ids[rank::world]
        ref = self.reference[rank::world]
        grad = reference_gradient(model, self.make_batch(ref), self.loss_fn)
        if len(mine):
            local = compute_influence(model, self.make_batch([self.dataset[int(i)] for i in mine]),
                                      loss_fn=self.loss_fn, reference_grad=grad)
            local_np = local.detach().double().cpu().numpy()
        else:
            local_np = np.zeros(0)
        rewards = _all_gather_interleaved(local_np, len(probe_ids))
        agents = self.dataset.agents
        update = update_weights([a.memory for a in agents], self.theta, [a.freq for a in agents],
                                self.dataset.label_ids(probe_ids), rewards,
                                lr_memory=self.config.lr_memory, lr_theta=self.config.lr_theta,
                                memory_floor=self.config.memory_floor,
                                memory_cap=self.config.memory_cap,
                                theta_floor=self.config.theta_floor)
        if update is None:
            self.skipped += 1
            warnings.warn(f'MADS update for version {version} skipped: non-finite influence '
                          f'(NaN/inf loss or gradients); weights unchanged.')
        else:
            for agent, memory in zip(agents, update.memories):
                agent.memory = memory
            self.theta = update.theta
        self._publish(version)
        self._trim()
        metrics = self.metrics(update, rewards)
        metrics['mads/update_time_s'] = time.perf_counter() - start
        return update, metrics

    def _trim(self) -> None:
        """Keep the versions a resume could still need (the current window onward)."""
        assert self.dataset is not None
        # lead < W, so batches still to come need version latest - 1 onward; one more as margin.
        keep_from = max(0, self.latest - 2)
        for v in [v for v in self.history if v < keep_from]:
            del self.history[v]

    # -- logging ---------------------------------------------------------------------------

    def metrics(self, update: Optional[Update], rewards: NDArray) -> dict[str, float]:
        """Weights, θ, reward statistics and selected-label shares, as flat metrics."""
        assert self.dataset is not None
        out: dict[str, float] = {
            'mads/version': float(self.latest),
            'mads/skipped_updates': float(self.skipped)
        }
        finite = rewards[np.isfinite(rewards)]
        if len(finite):
            out.update({'mads/reward/mean': float(finite.mean()),
                        'mads/reward/std': float(finite.std())})
        counts = self.dataset.board.kept_counts()
        delta = counts if self._last_counts is None else \
            [c - p for c, p in zip(counts, self._last_counts)]
        self._last_counts = counts
        for i, agent in enumerate(self.dataset.agents):
            out[f'mads/theta/{agent.name}'] = float(self.theta[i])
            if update is not None:
                out[f'mads/predictiveness/{agent.name}'] = float(update.predictiveness[i])
            mean = agent.memory.mean()
            total = delta[i].sum()
            for k, value in enumerate(agent.value_names):
                out[f'mads/memory/{agent.name}/{value}'] = float(agent.memory[k] / mean)
                if total > 0:
                    out[f'mads/selected_share/{agent.name}/{value}'] = float(delta[i][k] / total)
        return out

    # -- checkpointing ---------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """θ, memories, counters and every version a resume may still need."""
        agents = self.dataset.agents if self.dataset is not None else []
        return {
            'config': asdict(self.config),
            'theta': self.theta.tolist(),
            'agents': [a.state_dict() for a in agents],
            'latest': self.latest,
            'skipped': self.skipped,
            'versions': {str(v): {'theta': h['theta'].tolist(),
                                  'memories': [m.tolist() for m in h['memories']]}
                         for v, h in self.history.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore now if attached, else at :meth:`attach` (Composer loads before FIT_START)."""
        if self.dataset is None:
            self._pending = state
        else:
            self._restore(state)

    def _restore(self, state: dict[str, Any]) -> None:
        assert self.dataset is not None
        if state['config']['update_interval'] != self.config.update_interval:
            raise ValueError(f'Checkpoint used update_interval={state["config"]["update_interval"]}'
                             f' but this run has {self.config.update_interval}: resume with the '
                             'same schedule.')
        for agent, agent_state in zip(self.dataset.agents, state['agents'], strict=True):
            agent.load_state_dict(agent_state)
        self.theta = np.asarray(state['theta'], np.float64)
        self.skipped = int(state['skipped'])
        self.history = {}
        for v in sorted(int(k) for k in state['versions']):
            h = state['versions'][str(v)]
            memories = [np.asarray(m, np.float64) for m in h['memories']]
            theta = np.asarray(h['theta'], np.float64)
            self.dataset.publish(v, theta, memories)
            self.history[v] = {'theta': theta, 'memories': memories}
        self.latest = int(state['latest'])
