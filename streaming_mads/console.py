"""The agent console's state and update step, independent of Composer's event loop.

:class:`Console` holds θ, the agents (owned by the :class:`MADSDataset` it drives), the schedule
and the versions published so far. Its :meth:`Console.step` is one update: draw a stratified probe
set from candidates the ranks' workers logged since the last update (data each rank already read,
so probes cost no extra download and represent exactly what the loader samples), measure each
probe's influence on the reference loss with the live model on the rank that owns it, combine
across ranks, update memories and θ (:mod:`streaming_mads.rewards`) and publish the next version.
``algorithms.AgentConsole`` only decides *when* to call it and wires Composer's state into it.
"""

from __future__ import annotations

import math
import re
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

__all__ = ['ConsoleConfig', 'Console', 'prefetch_depth', 'metric_token']


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
        probe_pool (int): Most candidates, over all ranks, the probe set is stratified from; they
            are a uniform subset of the pools the ranks read since the last update. Defaults to
            ``4096``.
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


_BIN_RE = re.compile(r'^(?:<(?P<lt>[^,]+)|>=(?P<ge>[^,]+)|\[(?P<lo>[^,]+),(?P<hi>[^,]+)\))$')
_UNSAFE_RE = re.compile(r'[^A-Za-z0-9_.-]')


def _number_token(text: str) -> str:
    """A bin edge as a token: a leading minus becomes ``m``, so ``-`` only joins edges."""
    text = text.strip()
    return 'm' + text[1:] if text.startswith('-') else text


def metric_token(name: str) -> str:
    """``name`` (an agent or label value) as one level of a metric name every logger accepts.

    MLflow refuses a whole batch of metrics (the trainer's loss included) if one name holds a
    character outside letters, digits, ``_ - . / :`` and space; TensorBoard and W&B accept less
    still. So value names are reduced to letters, digits, ``_``, ``-`` and ``.``: bins read
    ``<1`` -> ``lt1``, ``[1,2)`` -> ``1-2``, ``>=4`` -> ``ge4``; any other character, a ``/``
    included (it would add a level to the name), becomes ``_``.
    """
    match = _BIN_RE.match(name.strip())
    if match:
        if match['lt'] is not None:
            name = 'lt' + _number_token(match['lt'])
        elif match['ge'] is not None:
            name = 'ge' + _number_token(match['ge'])
        else:
            name = f'{_number_token(match["lo"])}-{_number_token(match["hi"])}'
    return _UNSAFE_RE.sub('_', name) or '_'


def _metric_tokens(names: Sequence[str]) -> list[str]:
    """:func:`metric_token` of each name, made unique (``_<position>`` added on a clash)."""
    tokens = [metric_token(n) for n in names]
    seen: dict[str, int] = {}
    for t in tokens:
        seen[t] = seen.get(t, 0) + 1
    return [f'{t}_{k}' if seen[t] > 1 else t for k, t in enumerate(tokens)]


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


def _all_gather(value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order (just ``[value]`` without a process group)."""
    _, world = _world()
    if world == 1:
        return [value]
    gathered: list[Any] = [None] * world
    torch.distributed.all_gather_object(gathered, value)
    return gathered


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
        self.log_missing = 0
        self._pending: Optional[dict[str, Any]] = None
        self._last_counts: Optional[list[NDArray[np.int64]]] = None
        self._saved_log: dict[int, NDArray[np.int64]] = {}
        self._probe_candidates = 0

    # -- attaching -------------------------------------------------------------------------

    def attach(self, dataset: MADSDataset, depth: int, reference: Sequence[dict],
               batches_per_epoch: Optional[int] = None) -> None:
        """Take over ``dataset``'s agents, set the schedule and publish what batch 0 needs.

        Args:
            dataset (MADSDataset): The training dataset (this rank's copy).
            depth (int): The DataLoader's prefetch depth (``num_workers x prefetch_factor``).
            reference (Sequence[dict]): The reference samples (all ranks' share).
            batches_per_epoch (int, optional): Batches the trainer runs per epoch (Composer's
                ``state.dataloader_len``: after ``drop_last`` and ``train_subset_num_batches``).
                Defaults to every pool of the dataset.
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
        dataset.configure_schedule(cfg.update_interval, lead, batches_per_epoch)
        self.theta = dataset.initial_theta()
        self.latest = -1
        self.history = {}
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None
        else:
            self.publish(0)

    def publish(self, version: int) -> None:
        """Publish the current θ and memories as ``version`` (to this rank's workers)."""
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

    def probe_window(self, version: int) -> tuple[int, int]:
        """Global batches ``[start, stop)`` whose pools feed ``version``'s probes.

        The batches done since the previous update: every one of them was built (and its
        candidates' shards downloaded) by this rank's workers before the update runs.
        """
        stop = version * self.config.update_interval - self.lead
        return max(0, stop - self.config.update_interval), stop

    def _log_quota(self, batches: int) -> int:
        _, world = _world()
        return max(1, math.ceil(self.config.probe_pool / world / max(1, batches)))

    def _logged(self, version: int, before: Optional[int] = None) -> dict[int, NDArray[np.int64]]:
        """This rank's share of ``version``'s candidates per logged batch (before ``before``).

        Each logged batch gives its first ``quota`` candidates (a uniform subset: the log is in
        random order), from the restored checkpoint log or else the board; a batch whose log slot
        holds another batch is left out (``None`` in the result).
        """
        assert self.dataset is not None
        board = self.dataset.board
        batches = board.logged_batches(*self.probe_window(version))
        quota = self._log_quota(len(batches))
        out = {}
        for b in batches:
            if before is not None and b >= before:
                break
            ids = self._saved_log.get(b)
            ids = board.read_log(b) if ids is None else ids
            out[b] = None if ids is None else ids[:quota]
        return out

    def local_candidates(self, version: int) -> NDArray[np.int64]:
        """This rank's share of ``version``'s probe candidates, from its workers' probe log."""
        logged = self._logged(version)
        found = [ids for ids in logged.values() if ids is not None]
        self.log_missing += len(logged) - len(found)
        return np.concatenate(found) if found else np.empty(0, np.int64)

    def draw_probe(self, version: int) -> tuple[NDArray[np.int64], NDArray[np.int64]]:
        """``version``'s probe set (identical on every rank) and the rank that owns each probe.

        Every rank contributes candidates of the pools it read since the last update (a uniform
        draw of what the loader reads, over every stream as Streaming weighs it); the union is
        gathered, shuffled and stratified with a generator seeded by ``(seed, version)``. A
        probe is measured by the rank whose workers read it, so its shard is already local.
        """
        assert self.dataset is not None
        cfg = self.config
        parts = _all_gather(self.local_candidates(version))
        owners = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
        candidates = np.concatenate(parts).astype(np.int64)
        self._probe_candidates = len(candidates)
        if not len(candidates):
            return candidates, owners
        rng = np.random.default_rng((cfg.seed, version))
        order = rng.permutation(len(candidates))
        candidates, owners = candidates[order], owners[order]
        labels = self.dataset.label_ids(candidates)
        sizes = [agent.num_values for agent in self.dataset.agents]
        chosen = stratified_probe(labels, sizes, cfg.probe_size, rng)
        return candidates[chosen], owners[chosen]

    def step(self, model: torch.nn.Module, version: int) -> tuple[Optional[Update], dict[str, float]]:
        """One update producing ``version``; returns it and the metrics to log.

        Influence: each rank measures the probes it owns and takes every ``world``-th reference
        sample; the reference gradient is the exact mean over all reference samples (summed
        across ranks, whatever each rank's share, none included), the rewards are gathered, and
        every rank applies the same deterministic update to the same numbers.
        """
        assert self.dataset is not None
        start = time.perf_counter()
        rank, world = _world()
        probe_ids, owners = self.draw_probe(version)
        ref = self.reference[rank::world]
        grad = reference_gradient(model, self.make_batch(ref) if ref else None, self.loss_fn,
                                  num_samples=len(self.reference))
        mine = probe_ids[owners == rank]
        local_np = np.zeros(0)
        if len(mine):
            local = compute_influence(model, self.make_batch([self.dataset[int(i)] for i in mine]),
                                      loss_fn=self.loss_fn, reference_grad=grad)
            local_np = local.detach().double().cpu().numpy()
        rewards = np.empty(len(probe_ids), np.float64)
        for r, part in enumerate(_all_gather(local_np)):
            rewards[owners == r] = part
        agents = self.dataset.agents
        update = update_weights([a.memory for a in agents], self.theta, [a.freq for a in agents],
                                self.dataset.label_ids(probe_ids), rewards,
                                lr_memory=self.config.lr_memory, lr_theta=self.config.lr_theta,
                                memory_floor=self.config.memory_floor,
                                memory_cap=self.config.memory_cap,
                                theta_floor=self.config.theta_floor)
        if update is None:
            self.skipped += 1
            why = 'no probe candidates were logged' if not len(probe_ids) else \
                'non-finite influence (NaN/inf loss or gradients)'
            warnings.warn(f'MADS update for version {version} skipped: {why}; weights unchanged.')
        else:
            for agent, memory in zip(agents, update.memories):
                agent.memory = memory
            self.theta = update.theta
        self.publish(version)
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
        window_start = self.probe_window(self.latest + 1)[0]
        self._saved_log = {b: ids for b, ids in self._saved_log.items() if b >= window_start}

    # -- logging ---------------------------------------------------------------------------

    def metrics(self, update: Optional[Update], rewards: NDArray) -> dict[str, float]:
        """Weights, θ, reward statistics and selected-label shares, as flat metrics."""
        assert self.dataset is not None
        out: dict[str, float] = {
            'mads/version': float(self.latest),
            'mads/skipped_updates': float(self.skipped),
            'mads/probe_candidates': float(self._probe_candidates),
            'mads/probe_log_missing': float(self.log_missing),
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
            name = metric_token(agent.name)
            out[f'mads/theta/{name}'] = float(self.theta[i])
            if update is not None:
                out[f'mads/predictiveness/{name}'] = float(update.predictiveness[i])
            mean = agent.memory.mean()
            total = delta[i].sum()
            for k, value in enumerate(_metric_tokens(agent.value_names)):
                out[f'mads/memory/{name}/{value}'] = float(agent.memory[k] / mean)
                if total > 0:
                    out[f'mads/selected_share/{name}/{value}'] = float(delta[i][k] / total)
        return out

    # -- checkpointing ---------------------------------------------------------------------

    def _log_to_save(self, batches_done: int) -> dict[str, list[int]]:
        """This rank's probe candidates of the current window logged before ``batches_done``."""
        if self.dataset is None:
            return {}
        logged = self._logged(self.latest + 1, before=batches_done)
        return {str(b): ids.tolist() for b, ids in logged.items() if ids is not None}

    def state_dict(self, batches_done: Optional[int] = None) -> dict[str, Any]:
        """θ, memories, counters, every version a resume may still need, and the probe log.

        Args:
            batches_done (int, optional): Batches done (Composer's count). With it, every rank's
                probe candidates already logged for the next update are gathered into the state
                (collective: call on every rank), so a resumed run draws the same probes.
        """
        agents = self.dataset.agents if self.dataset is not None else []
        log = _all_gather(self._log_to_save(batches_done)) if batches_done is not None else []
        return {
            'config': asdict(self.config),
            'theta': self.theta.tolist(),
            'agents': [a.state_dict() for a in agents],
            'latest': self.latest,
            'skipped': self.skipped,
            'log_missing': self.log_missing,
            'probe_log': log,
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
        self.log_missing = int(state.get('log_missing', 0))
        rank, world = _world()
        log = state.get('probe_log') or []
        if len(log) == world:
            self._saved_log = {int(b): np.asarray(ids, np.int64) for b, ids in log[rank].items()}
        elif log:
            warnings.warn(f'The checkpoint holds probe logs of {len(log)} ranks but this run has '
                          f'{world}: the next update draws probes only from batches read after the '
                          'resume.')
        self.history = {}
        for v in sorted(int(k) for k in state['versions']):
            h = state['versions'][str(v)]
            memories = [np.asarray(m, np.float64) for m in h['memories']]
            theta = np.asarray(h['theta'], np.float64)
            self.dataset.publish(v, theta, memories)
            self.history[v] = {'theta': theta, 'memories': memories}
        self.latest = int(state['latest'])
