"""The agent console's state and update step, independent of Composer's event loop.

:class:`Console` holds θ, the agents (owned by the :class:`MADSDataset` it drives), the schedule
and the versions published so far. Its :meth:`Console.step` is one update: draw a stratified probe
set from candidates the ranks' workers logged since the last update (data each rank already read,
so probes cost no extra download and represent exactly what the loader samples), measure each
probe's influence on the reference loss with the live model on the rank that owns it, combine
across ranks, update memories and θ (:mod:`streaming_mads.console.rewards`) and publish the next version.
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

from streaming_mads.distributed import all_gather_object, broadcast_object, rank_world
from streaming_mads.selection.dataset import MADSDataset
from streaming_mads.influence.influence import PerSampleLoss, compute_influence, reference_gradient
from streaming_mads.influence.preconditioning import adam_preconditioned
from streaming_mads.console.rewards import REWARDS, Update, reward_signal, stratified_probe, update_weights
from streaming_mads.selection.scores import combined_scores, repeat_penalized, simulate_keep

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
        reference_size (int): Reference samples used for ``∇L_R`` at each update, over all ranks:
            a fresh draw from the whole reference set each update (seeded by ``seed`` and the
            version, the same on every rank). Defaults to ``32``.
        reward (str): ``'inner'`` (influence ``⟨∇ℓ(x), ∇L_R⟩``), ``'cosine'`` (divided by
            ``|∇ℓ(x)|``, so high-loss samples with large gradients do not dominate) or ``'adam'``
            (the influence of an Adam step: the reference gradient preconditioned by the
            trainer's Adam second moments; :mod:`streaming_mads.influence.preconditioning`). Defaults to
            ``'inner'``.
        value_prior (float): Pseudo-probes of reward 0 behind every label value's estimate, so a
            value seen in few probes moves its memory little. Defaults to ``4``.
        repeat_penalty (float): ``ρ``: a value's published weight is its memory divided by
            ``1 + ρ · e``, ``e`` the times each of its samples was kept on average so far (the
            paper's ``1 + 0.1 · count``, per label value). ``0`` turns it off. Defaults to
            ``0.1``.
        lr_memory (float): ``η`` of the agents' memories. Defaults to ``0.5``.
        lr_theta (float): ``η_θ`` of the collaborative weights. Defaults to ``1.0``.
        memory_floor (float): Smallest memory weight relative to the mean. Defaults to ``0.05``.
        memory_cap (float): Largest memory weight relative to the mean. Defaults to ``20``.
        theta_floor (float): Smallest share of θ per agent. Defaults to ``0.05``.
        seed (int): Seed of probe draws (with the version number). Defaults to ``0``.
        probe_micro_batch (int, optional): Most samples per forward/backward of the influence
            pass (reference and probes), so it needs no more activation memory than a training
            step. ``None``: the trainer's ``device_train_microbatch_size``. Defaults to ``None``.
        activation_checkpointing (bool): Recompute the model's blocks in the influence pass'
            backward instead of keeping their activations (about a third more influence compute,
            activation memory of about one block). Defaults to ``True``.
    """
    update_interval: int = 150
    lead: Optional[int] = None
    probe_size: int = 64
    probe_pool: int = 4096
    reference_size: int = 32
    reward: str = 'inner'
    value_prior: float = 4.0
    repeat_penalty: float = 0.1
    lr_memory: float = 0.5
    lr_theta: float = 1.0
    memory_floor: float = 0.05
    memory_cap: float = 20.0
    theta_floor: float = 0.05
    seed: int = 0
    probe_micro_batch: Optional[int] = None
    activation_checkpointing: bool = True

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
        if self.probe_micro_batch is not None and self.probe_micro_batch < 1:
            raise ValueError(f'probe_micro_batch must be >= 1, got {self.probe_micro_batch}.')
        if self.reward not in REWARDS:
            raise ValueError(f'mads_console reward={self.reward!r}: use one of {list(REWARDS)}.')
        if self.repeat_penalty < 0:
            raise ValueError(f'mads_console repeat_penalty must be >= 0, got {self.repeat_penalty}.')
        if not self.value_prior > 0:
            raise ValueError(f'mads_console value_prior must be > 0, got {self.value_prior}.')


#: Third seed word of the reference draws (keeps them apart from the probe draws' stream).
_REFERENCE_STREAM = 0x5EF
#: Third seed word of the simulated pools that estimate what the loader kept.
_KEEP_STREAM = 0x4EE

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


class Console:
    """θ, the schedule and the published versions of one run (one per rank, all identical).

    Args:
        config (ConsoleConfig): Settings.
        make_batch (Callable[[Sequence[dict]], Any]): Collates sample dicts (as the dataset yields
            them) into a model batch on the model's device.
        loss_fn (PerSampleLoss): Per-sample loss adapter for influence.
    """

    #: Whether :meth:`attach` requires a non-empty reference set.
    needs_reference = True

    def __init__(self, config: ConsoleConfig, make_batch: Callable[[Sequence[dict]], Any],
                 loss_fn: PerSampleLoss) -> None:
        self.config = config
        self.make_batch = make_batch
        self.loss_fn = loss_fn
        self.dataset: Optional[MADSDataset] = None
        self.reference: Sequence[dict] = []
        self.theta: NDArray[np.float64] = np.zeros(0)
        self.lead = 0
        self.latest = -1
        self.skipped = 0
        self.log_missing = 0
        self._pending: Optional[dict[str, Any]] = None
        self._last_counts: Optional[list[NDArray[np.int64]]] = None
        self._saved_log: dict[int, NDArray[np.int64]] = {}
        self._probe_candidates = 0
        self._window: NDArray[np.int64] = np.empty(0, np.int64)
        self.kept: list[NDArray[np.float64]] = []
        # Keyword arguments of the influence calls (micro-batch, autocast dtype, checkpointing);
        # AgentConsole completes them from the trainer's settings at FIT_START.
        self.influence_options: dict[str, Any] = {
            'micro_batch': config.probe_micro_batch,
            'checkpoint': config.activation_checkpointing}

    # -- attaching -------------------------------------------------------------------------

    def attach(self, dataset: MADSDataset, depth: int, reference: Sequence[dict],
               batches_per_epoch: Optional[int] = None) -> None:
        """Take over ``dataset``'s agents, set the schedule and publish what batch 0 needs.

        Args:
            dataset (MADSDataset): The training dataset (this rank's copy).
            depth (int): The DataLoader's prefetch depth (``num_workers x prefetch_factor``).
            reference (Sequence[dict]): The whole reference set (random access; each update
                reads only the samples it draws).
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
        if self.needs_reference and not len(reference):
            raise ValueError('The mads_console reference set is empty: point `reference` at a '
                             'non-empty dataset.')
        self.dataset, self.lead, self.reference = dataset, lead, reference
        self.kept = [np.zeros(agent.num_values) for agent in dataset.agents]
        dataset.configure_schedule(cfg.update_interval, lead, batches_per_epoch)
        self.theta = dataset.initial_theta()
        self.latest = -1
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None
        else:
            self.publish(0)

    def publish(self, version: int) -> None:
        """Publish the current θ and memories as ``version`` (to this rank's workers).

        The board is where published versions live (the console keeps only the current θ, the
        agents their current memory): checkpoints read the versions a resume needs back from it.
        """
        assert self.dataset is not None
        self.dataset.publish(version, self.theta, self.selection_memories())
        self.latest = version

    def exhaustion(self) -> list[NDArray[np.float64]]:
        """Per agent and value: estimated times each sample of the value was kept so far."""
        assert self.dataset is not None
        return [k / np.maximum(a.freq, 1) for k, a in zip(self.kept, self.dataset.agents)]

    def selection_memories(self) -> list[NDArray[np.float64]]:
        """The memories as published: each agent's, with the repeat penalty applied."""
        assert self.dataset is not None
        rate = self.config.repeat_penalty
        return [repeat_penalized(a.memory, e, rate) if rate > 0 else a.memory.copy()
                for a, e in zip(self.dataset.agents, self.exhaustion())]

    def count_kept(self, version: int) -> None:
        """Add the samples of each value the loader kept in ``version``'s probe window.

        Estimated by replaying the selection of the published weights on simulated pools of the
        window's gathered candidates (a uniform draw of the pools the ranks dealt;
        :func:`~streaming_mads.selection.scores.simulate_keep`): the same numbers on every rank, for
        any number of workers, and restored from checkpoints, where counting in the workers
        would depend on how far they prefetched.
        """
        assert self.dataset is not None
        ds = self.dataset
        if not len(self._window) or version < 1:
            return
        _, world = rank_world()
        start, stop = self.probe_window(version)
        # The window's batches were mostly selected by version - 1 (the first ``lead`` by the one
        # before): one version's weights stand for all of them.
        weights = ds.weights(version - 1)
        labels = ds.label_ids(self._window)
        keep = simulate_keep(combined_scores(ds.score_tables(weights), labels), ds.pool_size,
                             ds.device_batch_size, ds.temperature,
                             (self.config.seed, version, _KEEP_STREAM))
        kept = (stop - start) * ds.device_batch_size * world
        for a, ids in enumerate(labels):
            self.kept[a] += kept * np.bincount(ids, weights=keep, minlength=len(self.kept[a])) / \
                max(keep.sum(), 1e-300)

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
        _, world = rank_world()
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
        parts = all_gather_object(self.local_candidates(version))
        owners = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
        candidates = np.concatenate(parts).astype(np.int64)
        self._probe_candidates = len(candidates)
        self._window = candidates
        if not len(candidates):
            return candidates, owners
        rng = np.random.default_rng((cfg.seed, version))
        order = rng.permutation(len(candidates))
        candidates, owners = candidates[order], owners[order]
        labels = self.dataset.label_ids(candidates)
        sizes = [agent.num_values for agent in self.dataset.agents]
        chosen = stratified_probe(labels, sizes, cfg.probe_size, rng)
        return candidates[chosen], owners[chosen]

    def reference_ids(self, version: int) -> NDArray[np.int64]:
        """``version``'s reference subset: ``reference_size`` ids drawn from the whole set.

        A fresh draw each update (seeded by ``(seed, version)``, the same on every rank) makes
        the console follow the reference distribution rather than a few fixed documents.
        """
        n = len(self.reference)
        rng = np.random.default_rng((self.config.seed, version, _REFERENCE_STREAM))
        return np.sort(rng.choice(n, size=min(self.config.reference_size, n), replace=False))

    def _measure(self, model: torch.nn.Module, ids: NDArray[np.int64],
                 grad: Any) -> tuple[NDArray[np.float64], Optional[NDArray[np.float64]]]:
        """This rank's probes' influence and, for the cosine reward, their gradient norms."""
        assert self.dataset is not None
        # Every rank calls, one without probes with None: under FSDP the passes are collective.
        batch = self.make_batch([self.dataset[int(i)] for i in ids]) if len(ids) else None
        cosine = self.config.reward == 'cosine'
        out = compute_influence(model, batch, loss_fn=self.loss_fn, reference_grad=grad,
                                return_norms=cosine, **self.influence_options)
        inner, norms = out if cosine else (out, None)
        as_np = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
        return as_np(inner), None if norms is None else as_np(norms)

    def step(self, model: torch.nn.Module, version: int,
             optimizer: Optional[torch.optim.Optimizer] = None
             ) -> tuple[Optional[Update], dict[str, float]]:
        """One update producing ``version``; returns it and the metrics to log.

        Influence: each rank measures the probes it owns and takes every ``world``-th sample of
        the version's reference draw; the reference gradient is the exact mean over the draw
        (summed across ranks, whatever each rank's share, none included); the rewards are
        gathered, rank 0 computes the update and moves the memories, and every rank receives
        its result, so all ranks publish the same bytes. ``optimizer``: the trainer's, needed by
        ``reward: adam`` (its preconditioner).
        """
        assert self.dataset is not None
        cfg = self.config
        start = time.perf_counter()
        rank, world = rank_world()
        probe_ids, owners = self.draw_probe(version)
        ref_ids = self.reference_ids(version)
        ref = [self.reference[int(i)] for i in ref_ids[rank::world]]
        grad = reference_gradient(model, self.make_batch(ref) if ref else None, self.loss_fn,
                                  num_samples=len(ref_ids), **self.influence_options)
        if cfg.reward == 'adam':
            grad = adam_preconditioned(grad, optimizer)
        inner = np.empty(len(probe_ids), np.float64)
        norms = np.empty(len(probe_ids), np.float64)
        measured = all_gather_object(self._measure(model, probe_ids[owners == rank], grad))
        for r, (part, part_norms) in enumerate(measured):
            inner[owners == r] = part
            if part_norms is not None:
                norms[owners == r] = part_norms
        rewards = reward_signal(inner, norms, cfg.reward)
        agents = self.dataset.agents
        result = None
        if rank == 0:
            update = update_weights([a.score_table() for a in agents], self.theta,
                                    self.dataset.label_ids(probe_ids), rewards,
                                    lr_theta=cfg.lr_theta, theta_floor=cfg.theta_floor,
                                    value_prior=cfg.value_prior)
            if update is not None:
                for agent, effects in zip(agents, update.value_rewards):
                    agent.update(effects, cfg.lr_memory, cfg.memory_floor, cfg.memory_cap)
            if cfg.repeat_penalty > 0:
                self.count_kept(version)
            result = (update, [a.memory for a in agents], self.kept)
        update, memories, self.kept = broadcast_object(result)
        if update is None:
            self.skipped += 1
            why = 'no probe candidates were logged' if not len(probe_ids) else \
                'non-finite influence (NaN/inf loss or gradients)'
            warnings.warn(f'MADS update for version {version} skipped: {why}; weights unchanged.')
        else:
            for agent, memory in zip(agents, memories):
                agent.memory = memory
            self.theta = update.theta
        self.publish(version)
        self._trim()
        metrics = self.metrics(update, rewards)
        metrics['mads/update_time_s'] = time.perf_counter() - start
        return update, metrics

    def _trim(self) -> None:
        """Forget restored probe-log entries the next update no longer needs."""
        assert self.dataset is not None
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
        if self.kept:
            out['mads/repeat/max_exhaustion'] = float(max(e.max() for e in self.exhaustion()))
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

    def _versions_to_save(self) -> dict[str, dict[str, Any]]:
        """The versions a resume could still need, read back from the board.

        ``lead < W``, so batches still to come need version ``latest - 1`` onward; one more is
        kept as margin.
        """
        if self.dataset is None:
            return {}
        out = {}
        margin = min(2, self.dataset.board.capacity - 1)
        for v in range(max(0, self.latest - margin), self.latest + 1):
            weights = self.dataset.weights(v)
            assert weights is not None, f'version {v} is not on the board'
            out[str(v)] = {'theta': weights.theta.tolist(),
                           'memories': [m.tolist() for m in weights.memories]}
        return out

    def state_dict(self, batches_done: Optional[int] = None) -> dict[str, Any]:
        """θ, memories, counters, every version a resume may still need, and the probe log.

        Args:
            batches_done (int, optional): Batches done (Composer's count). With it, every rank's
                probe candidates already logged for the next update are gathered into the state
                (collective: call on every rank), so a resumed run draws the same probes.
        """
        agents = self.dataset.agents if self.dataset is not None else []
        log = all_gather_object(self._log_to_save(batches_done)) if batches_done is not None else []
        return {
            'config': asdict(self.config),
            'theta': self.theta.tolist(),
            'agents': [a.state_dict() for a in agents],
            'latest': self.latest,
            'skipped': self.skipped,
            'kept': [k.tolist() for k in self.kept],
            'log_missing': self.log_missing,
            'probe_log': log,
            'versions': self._versions_to_save(),
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
        if 'kept' in state:
            self.kept = [np.asarray(k, np.float64) for k in state['kept']]
        self.log_missing = int(state.get('log_missing', 0))
        rank, world = rank_world()
        log = state.get('probe_log') or []
        if len(log) == world:
            self._saved_log = {int(b): np.asarray(ids, np.int64) for b, ids in log[rank].items()}
        elif log:
            warnings.warn(f'The checkpoint holds probe logs of {len(log)} ranks but this run has '
                          f'{world}: the next update draws probes only from batches read after the '
                          'resume.')
        for v in sorted(int(k) for k in state['versions']):
            h = state['versions'][str(v)]
            self.dataset.publish(v, np.asarray(h['theta'], np.float64),
                                 [np.asarray(m, np.float64) for m in h['memories']])
        self.latest = int(state['latest'])
