"""The weight board: versioned weight tables in shared memory, from a rank to its DataLoader workers.

The console (in a rank's main process) publishes each new **version** of the agents' memories and
θ; the dataset's DataLoader workers (separate processes, forked or spawned, persistent or not)
read the version that governs the batch they are about to build. Shared memory is the one channel
every worker of the rank sees without a round trip through the trainer.

Layout (all 8-byte words): a header, the memory size of each agent, a ring of ``capacity``
weight slots, the selection counters, then the **probe log**. A weight slot holds ``[version, θ
(A values), memories (Σ sizes values)]``. There is one writer per board, which marks a slot
invalid, fills it, then stamps its version and finally raises the ``latest`` counter; readers
copy a slot and check its stamp before and after the copy, so a read never mixes two versions.

The schedule's numbers (``W``, ``L``, batches per epoch) live in the header, so every worker sees
what the rank's main process configured; :attr:`WeightBoard.schedule` reads them back as a
:class:`~streaming_mads.selection.schedule.Schedule`, which holds the version-schedule rule and
all of its arithmetic (which version governs a batch, the probe log's stride and slots).

The probe log is how the console draws its probes from data the rank already read: the worker
that builds the pool of a logged global batch ``b`` writes up to ``log_width`` of its candidates
(a uniform random subset, in random order) into ``b``'s log slot, stamped with ``b``.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
from numpy.typing import NDArray

from streaming_mads.selection.schedule import Schedule
from streaming_mads.streaming_internals import SharedMemory

__all__ = ['Weights', 'WeightBoard', 'VersionTimeoutError', 'VersionEvictedError',
           'VersionUnreachableError']

_MAGIC = 0x4D414453  # 'MADS'
_HEADER = 12  # magic, agents, capacity, interval, lead, latest, slot words, generation, ...
(_I_MAGIC, _I_AGENTS, _I_CAPACITY, _I_INTERVAL, _I_LEAD, _I_LATEST, _I_SLOT, _I_GEN,
 _I_EPOCH, _I_LIVE) = range(10)  # ... batches per epoch, whether a console publishes.
_TICK = 0.002


class VersionTimeoutError(TimeoutError):
    """A worker waited too long for a weight version that was never published."""


class VersionEvictedError(RuntimeError):
    """A worker asked for a weight version already overwritten on the board's ring."""


class VersionUnreachableError(RuntimeError):
    """A worker needs a weight version that will never be published: waiting cannot help."""


@dataclass(frozen=True)
class Weights:
    """One published version of the weights.

    Args:
        version (int): Version number.
        theta (NDArray): Collaborative weight per agent (sums to 1).
        memories (tuple[NDArray, ...]): Each agent's memory, in agent order.
    """
    version: int
    theta: NDArray[np.float64]
    memories: tuple[NDArray[np.float64], ...]

    def __eq__(self, other: Any) -> bool:
        return (isinstance(other, Weights) and self.version == other.version and
                np.array_equal(self.theta, other.theta) and len(self.memories) == len(other.memories)
                and all(np.array_equal(a, b) for a, b in zip(self.memories, other.memories)))


class WeightBoard:
    """Versioned weights of one rank in per-node shared memory.

    Create it in the rank's main process (``create=True``, done by :class:`MADSDataset`); it
    pickles by name and attaches lazily in worker processes.

    Args:
        name (str): Shared memory name (unique per dataset and rank on the node).
        agent_sizes (Sequence[int]): Number of label values of each agent.
        capacity (int): Versions kept on the ring. Must cover the versions in flight between the
            slowest worker and the newest publication (a few suffice; default 16).
        create (bool): Create (and reset) the segment instead of attaching to it.
        stats_rows (int): Rows of selection counters (one per DataLoader worker; workers beyond
            this share rows, making the counts approximate but never wrong in version or order).
        log_slots (int): Pools the probe log holds (see the module docstring).
        log_width (int): Most candidates logged per pool.
    """

    def __init__(self, name: str, agent_sizes: Sequence[int], capacity: int = 16,
                 create: bool = False, stats_rows: int = 64, log_slots: int = 512,
                 log_width: int = 32) -> None:
        if capacity < 2:
            raise ValueError(f'Board capacity must be at least 2, got {capacity}.')
        if log_slots < 2 or log_width < 1:
            raise ValueError(f'Need log_slots >= 2 and log_width >= 1, got {log_slots}, '
                             f'{log_width}.')
        self.name = name
        self.agent_sizes = tuple(int(n) for n in agent_sizes)
        self.capacity = int(capacity)
        self._slot_words = 1 + len(self.agent_sizes) + sum(self.agent_sizes)
        self.stats_rows = int(stats_rows)
        self._stats_start = _HEADER + len(self.agent_sizes) + self.capacity * self._slot_words
        self.log_slots, self.log_width = int(log_slots), int(log_width)
        self._log_start = self._stats_start + self.stats_rows * sum(self.agent_sizes)
        self._size = 8 * (self._log_start + self.log_slots * (2 + self.log_width))
        self._shm: Optional[SharedMemory] = None
        self._owner_pid = os.getpid() if create else -1
        if create:
            try:
                self._shm = SharedMemory(name=name, create=True, size=self._size)
            except FileExistsError:
                # Left by a destroyed dataset that held the same Streaming prefix: replace it.
                SharedMemory(name=name, create=False, auto_cleanup=False).shm.unlink()
                self._shm = SharedMemory(name=name, create=True, size=self._size)
            self.reset()

    # -- plumbing --------------------------------------------------------------------------

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state['_shm'] = None  # Workers attach by name.
        return state

    def _words(self) -> NDArray[np.int64]:
        if self._shm is None:
            try:
                self._shm = SharedMemory(name=self.name, create=False, size=self._size,
                                         auto_cleanup=False)
            except FileNotFoundError as err:
                raise RuntimeError(f'Weight board {self.name} does not exist: the MADSDataset '
                                   'that created it was destroyed before its workers ran.') from err
        return np.ndarray(self._size // 8, np.int64, buffer=self._shm.buf)

    def _floats(self) -> NDArray[np.float64]:
        return self._words().view(np.float64)

    def _slot_start(self, version: int) -> int:
        return _HEADER + len(self.agent_sizes) + (version % self.capacity) * self._slot_words

    def reset(self) -> None:
        """Forget every version and the schedule (no console attached: ``W = 0``)."""
        w = self._words()
        w[:] = 0
        w[_I_MAGIC], w[_I_AGENTS], w[_I_CAPACITY] = _MAGIC, len(self.agent_sizes), self.capacity
        w[_I_LATEST], w[_I_SLOT] = -1, self._slot_words
        w[_HEADER:_HEADER + len(self.agent_sizes)] = self.agent_sizes
        for v in range(self.capacity):
            w[self._slot_start(v)] = -1
        self._log()[:, 0] = -1

    # -- schedule --------------------------------------------------------------------------

    def configure(self, update_interval: int, lead: int, batches_per_epoch: int = 0) -> None:
        """Set the schedule (:class:`~streaming_mads.selection.schedule.Schedule`) for every worker.

        Args:
            update_interval (int): ``W``, batches per version (0: static version 0).
            lead (int): ``L``, batches before its first batch that a version is published; only
                recorded here so errors can name it.
            batches_per_epoch (int): Batches the trainer runs per epoch (``0``: the dataset's
                own count).
        """
        schedule = Schedule(update_interval, lead, batches_per_epoch, self.log_slots)
        w = self._words()
        w[_I_INTERVAL], w[_I_LEAD], w[_I_EPOCH] = (schedule.update_interval, schedule.lead,
                                                   schedule.batches_per_epoch)
        w[_I_LIVE] = 1

    def detach(self) -> None:
        """The console stopped publishing (its ``Trainer.fit`` ended): from now on a worker that
        needs a version not yet published fails at once instead of waiting for it."""
        self._words()[_I_LIVE] = 0

    @property
    def schedule(self) -> Schedule:
        """The schedule as configured (``W = 0`` before a console configures one)."""
        w = self._words()
        return Schedule(int(w[_I_INTERVAL]), int(w[_I_LEAD]), int(w[_I_EPOCH]), self.log_slots)

    @property
    def batches_per_epoch(self) -> int:
        """Batches the trainer runs per epoch, as configured (0: not configured)."""
        return self.schedule.batches_per_epoch

    @property
    def log_stride(self) -> int:
        """Every ``log_stride``-th global batch writes the probe log (0: no console, no log)."""
        return self.schedule.log_stride

    @property
    def latest(self) -> int:
        """Newest published version, ``-1`` if none."""
        return int(self._words()[_I_LATEST])

    def version_for_batch(self, batch: int) -> int:
        """The version that governs global batch ``batch``."""
        return self.schedule.version_for_batch(batch)

    # -- versions --------------------------------------------------------------------------

    def publish(self, version: int, theta: NDArray, memories: Sequence[NDArray]) -> None:
        """Publish ``version`` (single writer: the rank's main process).

        Args:
            version (int): Version number (``>= 0``).
            theta (NDArray): Collaborative weights, one per agent.
            memories (Sequence[NDArray]): Each agent's memory, sized as ``agent_sizes``.
        """
        theta = np.asarray(theta, np.float64)
        if version < 0 or theta.shape != (len(self.agent_sizes),) or \
                tuple(len(m) for m in memories) != self.agent_sizes:
            raise ValueError(f'Weights do not fit the board: version {version}, theta '
                             f'{theta.shape}, memories {[len(m) for m in memories]} vs agents '
                             f'{self.agent_sizes}.')
        # A NaN score would read as padding and its pool would keep nothing: refuse it here.
        parts = {'theta': theta, **{f'memory of agent {a}': np.asarray(m, np.float64)
                                    for a, m in enumerate(memories)}}
        bad = [f'{what} {w.tolist()}' for what, w in parts.items()
               if not np.all(np.isfinite(w) & (w >= 0))]
        if bad:
            raise ValueError(f'Weight version {version} is not publishable: {"; ".join(bad)} (θ '
                             f'and memories must be finite and >= 0). A learning rate or '
                             f'checkpoint produced it: check lr_theta, lr_memory and the agents\' '
                             f'init.')
        words, floats = self._words(), self._floats()
        start = self._slot_start(version)
        words[start] = -1
        payload = np.concatenate([theta] + [np.asarray(m, np.float64) for m in memories])
        floats[start + 1:start + self._slot_words] = payload
        words[start] = version
        if version > words[_I_LATEST]:
            words[_I_LATEST] = version

    def read(self, version: int) -> Optional[Weights]:
        """The weights of ``version``, or ``None`` if not published yet.

        Raises:
            VersionEvictedError: The version was overwritten by a newer one on the ring.
        """
        words, floats = self._words(), self._floats()
        start = self._slot_start(version)
        for _ in range(1000):
            stamp = int(words[start])
            if stamp == version:
                payload = floats[start + 1:start + self._slot_words].copy()
                if int(words[start]) == version:
                    return self._unpack(version, payload)
                continue  # Rewritten while copying: retry.
            if stamp > version or (stamp == -1 and int(words[_I_LATEST]) >= version + self.capacity):
                raise VersionEvictedError(
                    f'Weight version {version} was overwritten on the board (capacity '
                    f'{self.capacity}, newest {self.latest}): raise `board_capacity`.')
            if stamp == -1 and int(words[_I_LATEST]) >= version:
                time.sleep(_TICK)  # Being written right now.
                continue
            return None
        return None

    def _unpack(self, version: int, payload: NDArray) -> Weights:
        a = len(self.agent_sizes)
        bounds = np.cumsum((a,) + self.agent_sizes)
        memories = tuple(payload[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:]))
        return Weights(version, payload[:a], memories)

    def wait_for(self, version: int, timeout: float, batch: Optional[int] = None) -> Weights:
        """Block until ``version`` is published, then return it; never substitutes another.

        Args:
            version (int): The version needed.
            timeout (float): Seconds to wait before failing.
            batch (int, optional): The global batch that needs it (for the error message).

        Raises:
            VersionTimeoutError: Not published within ``timeout``; the message names the lead.
        """
        deadline = time.monotonic() + timeout
        while True:
            weights = self.read(version)
            if weights is not None:
                return weights
            self._check_reachable(version, batch)
            if time.monotonic() >= deadline:
                where = f' for global batch {batch}' if batch is not None else ''
                schedule = self.schedule
                raise VersionTimeoutError(
                    f'A DataLoader worker waited {timeout:g}s for weight version {version}{where}, '
                    f'but the newest published is {self.latest} (update interval '
                    f'{schedule.update_interval}, lead {schedule.lead}). Workers prefetch ahead of the '
                    f'trainer: the console\'s `lead` must exceed num_workers x prefetch_factor '
                    f'batches, so raise `lead` (or lower prefetch), or raise the dataset\'s '
                    f'`version_timeout` if updates are just slow.')
            time.sleep(_TICK)

    def _check_reachable(self, version: int, batch: Optional[int]) -> None:
        """Raise :class:`VersionUnreachableError` if ``version`` cannot come, whatever the wait.

        Two cases. No console is running (one configured the schedule, then its fit ended), so
        nothing publishes. Or the version is two or more past the newest: the console publishes
        version ``v`` once the trainer has done ``v·W − L`` batches and a worker runs at most
        ``num_workers x prefetch_factor < L`` batches ahead, so a worker whose batches are the
        trainer's never needs more than the next version; one that does counts batches the
        trainer never runs, and the trainer would wait on it forever.
        """
        words = self._words()
        latest = int(words[_I_LATEST])
        if words[_I_LIVE] and version < latest + 2:
            return
        reason = ('no console is running: versions after 0 are published only inside '
                  'Trainer.fit, by AgentConsole or DomainBandit, and this fit has ended'
                  ) if not words[_I_LIVE] else (
                      f'the newest published is {latest}, and a worker whose batches are the '
                      f'trainer\'s never needs more than the next one')
        where = f' for global batch {batch}' if batch is not None else ''
        raise VersionUnreachableError(
            f'A DataLoader worker needs weight version {version}{where}, which will not be '
            f'published: {reason}. The DataLoader\'s batches must be the trainer\'s: give the '
            f'DataLoader the MADSDataset\'s batch_size, and iterate it only inside Trainer.fit '
            f'(a batch taken before fit is fine); to look at what a finished run selects, build a '
            f'new MADSDataset and publish the weights to it.')

    # -- selection statistics -------------------------------------------------------------

    def _stats(self) -> NDArray[np.int64]:
        return self._words()[self._stats_start:self._log_start].reshape(self.stats_rows,
                                                                     sum(self.agent_sizes))

    def record_kept(self, row: int, label_ids: Sequence[NDArray]) -> None:
        """Count kept samples by label value (called by the worker owning ``row``)."""
        counts = self._stats()[row % self.stats_rows]
        offset = 0
        for ids, size in zip(label_ids, self.agent_sizes):
            counts[offset:offset + size] += np.bincount(ids, minlength=size)
            offset += size

    def kept_counts(self) -> list[NDArray[np.int64]]:
        """Kept samples per label value of each agent, over all workers since the reset."""
        total = self._stats().sum(axis=0)
        bounds = np.cumsum((0,) + self.agent_sizes)
        return [total[lo:hi] for lo, hi in zip(bounds[:-1], bounds[1:])]

    # -- probe log ------------------------------------------------------------------------

    def _log(self) -> NDArray[np.int64]:
        return self._words()[self._log_start:].reshape(self.log_slots, 2 + self.log_width)

    def _log_row(self, batch: int) -> Optional[NDArray[np.int64]]:
        """The log slot of global batch ``batch``, or ``None`` if the batch is off the stride."""
        slot = self.schedule.log_slot(batch)
        return None if slot is None else self._log()[slot]

    def logged_batches(self, start: int, stop: int) -> range:
        """The global batches in ``[start, stop)`` that write the probe log."""
        return self.schedule.logged_batches(start, stop)

    def write_log(self, batch: int, sample_ids: NDArray[np.int64]) -> None:
        """Log candidates of global batch ``batch``'s pool (its worker; a no-op off the stride).

        Args:
            batch (int): Global batch number of the pool.
            sample_ids (NDArray[np.int64]): Candidates, in random order; the first ``log_width``
                are kept.
        """
        row = self._log_row(batch)
        if row is None:
            return
        ids = np.asarray(sample_ids, np.int64)[:self.log_width]
        row[0] = -1
        row[1] = len(ids)
        row[2:2 + len(ids)] = ids
        row[0] = batch

    def read_log(self, batch: int) -> Optional[NDArray[np.int64]]:
        """The candidates global batch ``batch`` logged, or ``None`` if its slot holds another."""
        row = self._log_row(batch)
        if row is None or int(row[0]) != batch:
            return None
        ids = row[2:2 + int(row[1])].copy()
        return ids if int(row[0]) == batch else None

    def cleanup(self) -> None:
        """Release the segment (the creator unlinks it)."""
        if self._shm is not None:
            if os.getpid() == self._owner_pid:
                self._shm.cleanup()
            else:  # A forked worker inherited the creator's handle: close, never unlink.
                self._shm.shm.close()
            self._shm = None
