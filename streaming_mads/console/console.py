"""The console's loop, independent of Composer's event loop: probe, measure, learn, publish.

:class:`Console` holds θ, the schedule and the published versions; the agents are the
:class:`MADSDataset`'s. Probes are candidates the ranks' workers already read (no extra download,
exactly what the loader samples), each measured on the rank that read it. :meth:`Console.step`
is the one loop; the update rule is :meth:`Console.measure` and :meth:`Console.learn` (influence
and :mod:`~streaming_mads.console.rewards` here, EXP3 in :mod:`~streaming_mads.console.bandit`).
docs/architecture.md has the long form.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from numpy.typing import NDArray

from streaming_mads.console.config import ConsoleConfig
from streaming_mads.console.history import weights_record
from streaming_mads.console.metrics import metric_token, weight_metrics
from streaming_mads.console.rewards import (Evidence, Update, apply_rule, inclusion_probabilities,
                                            reward_signal, systematic_sample)
from streaming_mads.distributed import all_gather_object, broadcast_object, rank_world
from streaming_mads.influence import PerSampleLoss, compute_influence, reference_gradient
from streaming_mads.influence.preconditioning import adam_preconditioned
from streaming_mads.selection.dataset import MADSDataset
from streaming_mads.selection.schedule import Schedule
from streaming_mads.selection.scores import combined_scores, repeat_penalized, simulate_keep

__all__ = ['Console', 'prefetch_depth']


#: Third seed word of the reference draws (keeps them apart from the probe draws' stream).
_REFERENCE_STREAM = 0x5EF
#: Third seed word of the simulated pools that estimate what the loader kept.
_KEEP_STREAM = 0x4EE


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
        # Rank 0: the inclusion probability of each probe of the last draw, in probe order.
        self._probe_pi: NDArray[np.float64] = np.empty(0)
        self.kept: list[NDArray[np.float64]] = []
        #: The :meth:`weights_record` of the last :meth:`metrics` (the weight history's entry).
        self.last_record: Optional[dict[str, Any]] = None
        self.evidence: Optional[Evidence] = None
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
        lead = self._lead(depth)
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
        self._check_dataset(dataset, lead)
        self.dataset, self.lead, self.reference = dataset, lead, reference
        self.kept = [np.zeros(agent.num_values) for agent in dataset.agents]
        dataset.configure_schedule(cfg.update_interval, lead, batches_per_epoch)
        self._check_schedule()
        self.theta = np.ones(len(dataset.agents)) if cfg.rule == 'evidence' else \
            dataset.initial_theta()
        self.evidence = Evidence([a.num_values for a in dataset.agents]) \
            if cfg.rule == 'evidence' else None
        self.latest = -1
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None
        else:
            self.publish(0)

    def _check_dataset(self, dataset: MADSDataset, lead: int) -> None:
        """The settings that depend on the dataset and the world, checked before any batch."""
        cfg = self.config
        agents = len(dataset.agents)
        if not agents:
            raise ValueError('The MADSDataset has no agents (agents=[]), so there is nothing to '
                             'steer: give it agents, or drop the console algorithm.')
        if cfg.theta_floor * agents > 1:
            raise ValueError(f'mads_console theta_floor={cfg.theta_floor} is impossible for '
                             f'{agents} agents: use at most 1/{agents} = {1 / agents:.4g}.')
        # The fewest candidates any full window logs (the first, W - L batches, may hold fewer).
        _, world = rank_world()
        schedule = Schedule(cfg.update_interval, lead, log_slots=dataset.board.log_slots)
        logged = cfg.update_interval // schedule.log_stride
        each = min(dataset.board.log_width, dataset.pool_size,
                   schedule.log_quota(cfg.probe_pool, world, logged))
        if cfg.probe_size > world * logged * each:
            raise ValueError(
                f'mads_console probe_size={cfg.probe_size} cannot be drawn: an update window logs '
                f'at most {world * logged * each} candidates ({world} rank(s) x {logged} logged '
                f'batches of update_interval={cfg.update_interval} x {each} each, the fewest of '
                f'the probe log\'s {dataset.board.log_width} per pool, the pool\'s '
                f'{dataset.pool_size} candidates and probe_pool={cfg.probe_pool}\'s share). Use '
                f'probe_size <= {world * logged * each}, or raise update_interval, the pool '
                f'(batch_size x pool_ratio) or probe_pool.')

    def detach(self) -> None:
        """Stop steering (the trainer's fit ended): a worker that then needs an unpublished
        version fails at once instead of waiting ``version_timeout``."""
        if self.dataset is not None:
            self.dataset.board.detach()

    def _saved_schedule(self) -> Optional[dict[str, int]]:
        """The schedule recorded in the checkpoint being resumed (``None``: no resume, or a
        checkpoint from before it was recorded)."""
        return (self._pending or {}).get('schedule')

    def _lead(self, depth: int) -> int:
        """``L``: the setting, else the checkpoint's (resumed runs), else ``depth + 1``.

        The default follows the DataLoader's prefetch depth, which a resume may change (another
        ``num_workers``); a resumed run keeps the lead it was checkpointed with, so its batches
        are those of an uninterrupted run, and is refused when that lead no longer exceeds the
        prefetch depth. An explicit ``lead`` other than the checkpoint's is taken, with a
        warning: the schedule, and so the batches, change from the resume point on.
        """
        cfg = self.config
        saved = self._saved_schedule()
        if saved is None:
            return depth + 1 if cfg.lead is None else cfg.lead
        old = int(saved['lead'])
        if cfg.lead is None:
            if old <= depth:
                raise ValueError(
                    f'The checkpoint was taken with mads_console lead={old}, which this run\'s '
                    f'DataLoader prefetch depth num_workers x prefetch_factor = {depth} does not '
                    f'stay below, so its schedule cannot be kept and the batches after the resume '
                    f'would differ from an uninterrupted run\'s. Resume with num_workers x '
                    f'prefetch_factor below {old} (e.g. the checkpointed run\'s num_workers), or '
                    f'set mads_console lead (>= {depth + 1}) to accept a new schedule from the '
                    'resume point on.')
            return old
        if cfg.lead != old:
            warnings.warn(f'mads_console lead={cfg.lead} but the checkpoint was taken with '
                          f'lead={old}: the version schedule changes from the resume point on, '
                          'so the batches differ from an uninterrupted run\'s.')
        return cfg.lead

    def _check_schedule(self) -> None:
        """Refuse a resume whose global batches would be numbered otherwise than the
        checkpointed run's (another ``batches_per_epoch``)."""
        assert self.dataset is not None
        saved = self._saved_schedule()
        now = self.dataset.board.schedule.batches_per_epoch
        if saved is not None and int(saved['batches_per_epoch']) != now:
            raise ValueError(
                f'The checkpoint was taken with {saved["batches_per_epoch"]} batches per epoch but '
                f'this run has {now} (another dataset, batch size, drop_last or '
                'train_subset_num_batches): the versions follow the global batch count, so resume '
                'with the settings of the checkpointed run.')

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
        if self.dataset is None:
            return None
        return self.dataset.board.schedule.due(self.latest, batches_done)

    # -- the update step -------------------------------------------------------------------

    def probe_window(self, version: int) -> tuple[int, int]:
        """Global batches ``[start, stop)`` whose pools feed ``version``'s probes (the batches
        done since the previous update; :mod:`streaming_mads.selection.schedule`)."""
        assert self.dataset is not None
        return self.dataset.board.schedule.probe_window(version)

    def _log_quota(self, batches: int) -> int:
        assert self.dataset is not None
        _, world = rank_world()
        return self.dataset.board.schedule.log_quota(self.config.probe_pool, world, batches)

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
        self._probe_pi = np.empty(0)
        if not len(candidates):
            return candidates, owners
        rng = np.random.default_rng((cfg.seed, version))
        order = rng.permutation(len(candidates))
        candidates, owners = candidates[order], owners[order]
        chosen = None
        # Rank 0's draw for all: the design's probabilities are floating point, and a rank whose
        # math library rounds differently must not measure a different probe set. Rank 0 keeps
        # the probes' probabilities for the regression's weights (:meth:`probe_weights`).
        if rank_world()[0] == 0:
            pi = inclusion_probabilities(self.dataset.label_ids(candidates),
                                         [agent.num_values for agent in self.dataset.agents],
                                         cfg.probe_size)
            chosen = systematic_sample(pi, rng)
            self._probe_pi = pi[chosen]
        chosen = broadcast_object(chosen)
        return candidates[chosen], owners[chosen]

    def reference_ids(self, version: int) -> NDArray[np.int64]:
        """``version``'s reference subset: ``reference_size`` ids drawn from the whole set.

        A fresh draw each update (seeded by ``(seed, version)``, the same on every rank) makes
        the console follow the reference distribution rather than a few fixed documents.
        """
        n = len(self.reference)
        rng = np.random.default_rng((self.config.seed, version, _REFERENCE_STREAM))
        return np.sort(rng.choice(n, size=min(self.config.reference_size, n), replace=False))

    def step(self, model: torch.nn.Module, version: int,
             optimizer: Optional[torch.optim.Optimizer] = None) -> tuple[Any, dict[str, float]]:
        """One update producing ``version``; returns what the rule applied and the metrics to log.

        The loop every console shares: draw ``version``'s probe set (:meth:`draw_probe`), let
        each rank measure the probes it owns (:meth:`measure`, collective), gather the numbers
        into probe order, hand them to the update rule (:meth:`learn`: new memories and θ, or
        ``None`` to skip), publish ``version`` and collect the metrics. A subclass supplies only
        :meth:`measure` and :meth:`learn` (and may add metrics). ``optimizer``: the trainer's,
        for a rule that needs it (``reward: adam``).
        """
        assert self.dataset is not None
        start = time.perf_counter()
        rank, _ = rank_world()
        probe_ids, owners = self.draw_probe(version)
        signal = np.empty(len(probe_ids), np.float64)
        for r, part in enumerate(all_gather_object(
                self.measure(model, version, probe_ids[owners == rank], optimizer))):
            signal[owners == r] = part
        update = self.learn(version, probe_ids, signal)
        if update is None:
            self.skipped += 1
        self.publish(version)
        self._trim()
        metrics = self.metrics(update, signal)
        metrics['mads/update_time_s'] = time.perf_counter() - start
        return update, metrics

    def measure(self, model: torch.nn.Module, version: int, ids: NDArray[np.int64],
                optimizer: Optional[torch.optim.Optimizer] = None) -> NDArray[np.float64]:
        """The reward of each of this rank's probes ``ids``: its influence on the reference loss.

        Each rank takes every ``world``-th sample of ``version``'s reference draw; the reference
        gradient is the exact mean over the draw (summed across ranks, whatever each rank's
        share, none included). Every rank calls, one without probes too: under FSDP the passes
        are collective.
        """
        assert self.dataset is not None
        cfg = self.config
        rank, world = rank_world()
        ref_ids = self.reference_ids(version)
        ref = [self.reference[int(i)] for i in ref_ids[rank::world]]
        grad = reference_gradient(model, self.make_batch(ref) if ref else None, self.loss_fn,
                                  num_samples=len(ref_ids), **self.influence_options)
        if cfg.reward == 'adam':
            grad = adam_preconditioned(grad, optimizer)
        batch = self.make_batch([self.dataset[int(i)] for i in ids]) if len(ids) else None
        cosine = cfg.reward == 'cosine'
        out = compute_influence(model, batch, loss_fn=self.loss_fn, reference_grad=grad,
                                return_norms=cosine, **self.influence_options)
        inner, norms = out if cosine else (out, None)
        as_np = lambda t: t.detach().double().cpu().numpy()  # noqa: E731
        return reward_signal(as_np(inner), None if norms is None else as_np(norms), cfg.reward)

    def learn(self, version: int, probe_ids: NDArray[np.int64],
              rewards: NDArray[np.float64]) -> Optional[Update]:
        """The update rule (:mod:`streaming_mads.console.rewards`): move the memories and θ.

        Rank 0 computes the update and moves the memories, and every rank receives its result,
        so all ranks publish the same bytes. ``None`` (weights unchanged, with a warning) when no
        probe was logged or an influence is not finite.
        """
        assert self.dataset is not None
        cfg = self.config
        agents = self.dataset.agents
        result = None
        if rank_world()[0] == 0:
            update = apply_rule(agents, self.theta, self.dataset.label_ids(probe_ids), rewards, cfg,
                                selection_tables=self.selection_tables(version),
                                probe_weights=self.probe_weights(probe_ids),
                                evidence=self.evidence)
            if cfg.repeat_penalty > 0:
                self.count_kept(version)
            result = (update, [a.memory for a in agents], self.kept, self.evidence)
        update, memories, self.kept, self.evidence = broadcast_object(result)
        if update is None:
            why = 'no probe candidates were logged' if not len(probe_ids) else \
                'non-finite influence (NaN/inf loss or gradients)'
            warnings.warn(f'MADS update for version {version} skipped: {why}; weights unchanged.')
            return None
        for agent, memory in zip(agents, memories):
            agent.memory = memory
        self.theta = update.theta
        return update

    def selection_tables(self, version: int) -> list[NDArray[np.float64]]:
        """Each agent's score table as the selection of ``version``'s probe window used it: the
        published (repeat-penalised) memories of ``version - 1``, without θ (predictiveness
        standardises each agent's scores). θ is credited on what selected, not on the memories
        before the penalty."""
        assert self.dataset is not None
        weights = self.dataset.weights(version - 1) if version >= 1 else None
        memories = weights.memories if weights is not None else self.selection_memories()
        return [a.score_table(m) for a, m in zip(self.dataset.agents, memories)]

    def probe_weights(self, probe_ids: NDArray[np.int64]) -> NDArray[np.float64]:
        """Inverse inclusion probability of each probe of the last draw, on rank 0 (the design
        over-represents rare values; :func:`inclusion_probabilities`), as :meth:`draw_probe`
        computed it for the draw."""
        if len(self._probe_pi) != len(probe_ids):
            raise RuntimeError(f'{len(probe_ids)} probes but {len(self._probe_pi)} inclusion '
                               'probabilities: probe_weights needs the probe set of the last '
                               'draw_probe, on rank 0.')
        return 1.0 / np.maximum(self._probe_pi, 1e-12)

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
        self.last_record = self.weights_record()
        out.update(weight_metrics(self.last_record))
        for i, agent in enumerate(self.dataset.agents):
            name = metric_token(agent.name)
            if update is not None:
                out[f'mads/predictiveness/{name}'] = float(update.predictiveness[i])
                if update.gates is not None:
                    out[f'mads/gate/{name}'] = float(update.gates[i])
        return out

    def weights_record(self) -> dict[str, Any]:
        """θ, the memories and the shares of what the loader kept since the previous call
        (:func:`~streaming_mads.console.history.weights_record`)."""
        assert self.dataset is not None
        counts = self.dataset.board.kept_counts()
        delta = counts if self._last_counts is None else \
            [c - p for c, p in zip(counts, self._last_counts)]
        self._last_counts = counts
        return weights_record(self.dataset.agents, self.theta, delta)

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
        """θ, memories, counters, the schedule, every version a resume may still need, and the
        probe log.

        The schedule (``update_interval``, ``lead``, ``batches_per_epoch``) is what the run
        really used, the default lead included, so a resume keeps it (:meth:`_lead`).

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
            'evidence': None if self.evidence is None else self.evidence.state_dict(),
            'log_missing': self.log_missing,
            'probe_log': log,
            'versions': self._versions_to_save(),
            'schedule': self._schedule_to_save(),
        }

    def _schedule_to_save(self) -> Optional[dict[str, int]]:
        if self.dataset is None:
            return self._saved_schedule()
        sched = self.dataset.board.schedule
        return {'update_interval': sched.update_interval, 'lead': sched.lead,
                'batches_per_epoch': sched.batches_per_epoch}

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
        if state.get('evidence') is not None:
            self.evidence = Evidence.from_state(state['evidence'])
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
