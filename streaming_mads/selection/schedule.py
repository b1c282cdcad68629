"""The version schedule: which weight version governs a batch, when it is published, what it probes.

This is the one statement of the version-schedule rule; every other docstring points here (and
docs/architecture.md, "The weight board", says it in prose). Three numbers, set by the console at
``FIT_START`` and shared with the DataLoader workers through the rank's weight board:

* ``W`` (``update_interval``): batches per version; ``W = 0`` means no console is attached and
  version 0 governs everything.
* ``L`` (``lead``): a version is published ``L`` batches before its first batch, so ``L`` must
  exceed the DataLoader's prefetch depth (``num_workers x prefetch_factor``); the console also
  keeps it below ``W``.
* ``batches_per_epoch``: what the trainer really runs per epoch (after ``drop_last`` and
  ``train_subset_num_batches``; ``0``: not set, the dataset's pool count stands in).

The rule:

* The clock is Composer's batch count: batch ``b`` of epoch ``e`` is global batch
  ``e · batches_per_epoch + b``.
* Version ``v`` governs global batches ``[v·W, (v+1)·W)``.
* A pool past ``batches_per_epoch`` (a partial pool ``drop_last`` drops, batches beyond
  ``train_subset_num_batches``) is never seen by the trainer: it is selected with the epoch's last
  version and neither logged nor counted, so the windows do not drift over epochs.
* The console publishes version ``v`` once ``v·W − L`` batches are done.
* Version ``v``'s probes come from the **probe window** ``[(v−1)·W − L, v·W − L)`` (from 0 at
  the start): the batches done since the previous update, every one of them already built by
  the rank's workers when the update runs.
* The probe log holds every ``stride``-th global batch, ``stride = ⌈2W / log_slots⌉``, so two
  windows fit on its ring of ``log_slots`` slots: the one the console reads next, and the
  prefetch the workers can be ahead. Global batch ``b`` (on the stride) uses slot
  ``(b / stride) mod log_slots``.
* Each rank takes at most ``⌈probe_pool / world / logged batches⌉`` candidates (at least 1) from
  each logged batch of a window, so the ranks' union holds about ``probe_pool``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional

__all__ = ['Schedule']


@dataclass(frozen=True)
class Schedule:
    """The version schedule's numbers and all of its arithmetic (see the module docstring).

    Args:
        update_interval (int): ``W``, batches per version (0: no console, version 0 throughout).
        lead (int): ``L``, batches before its first batch that a version is published.
        batches_per_epoch (int): Batches the trainer runs per epoch (0: not set).
        log_slots (int): Slots of the probe log's ring the stride is sized for.
    """
    update_interval: int = 0
    lead: int = 0
    batches_per_epoch: int = 0
    log_slots: int = 512

    def __post_init__(self) -> None:
        if self.update_interval < 0 or self.lead < 0 or self.batches_per_epoch < 0:
            raise ValueError('update_interval, lead and batches_per_epoch must be non-negative.')
        if self.log_slots < 1:
            raise ValueError(f'log_slots must be positive, got {self.log_slots}.')

    def with_epoch(self, batches_per_epoch: int) -> Schedule:
        """This schedule, with ``batches_per_epoch`` filled in where it is not set."""
        if self.batches_per_epoch:
            return self
        return replace(self, batches_per_epoch=batches_per_epoch)

    # -- which version governs a batch -------------------------------------------------------

    def global_batch(self, epoch: int, batch: int) -> int:
        """Composer's count of batch ``batch`` of ``epoch``: the schedule's clock."""
        return epoch * self.batches_per_epoch + batch

    def counted(self, batch: int) -> bool:
        """Whether the trainer runs batch ``batch`` of an epoch (so its pool is logged, counted)."""
        return batch < self.batches_per_epoch

    def pool_batch(self, epoch: int, batch: int) -> int:
        """The global batch whose version selects pool ``batch`` of ``epoch`` (an uncounted pool
        takes the epoch's last)."""
        return self.global_batch(epoch, min(batch, self.batches_per_epoch - 1))

    def version_for_batch(self, batch: int) -> int:
        """The version that governs global batch ``batch``."""
        return batch // self.update_interval if self.update_interval > 0 else 0

    # -- when the console publishes, what it probes ------------------------------------------

    def publish_at(self, version: int) -> int:
        """Batches done when ``version`` is published: ``v·W − L``."""
        return version * self.update_interval - self.lead

    def due(self, latest: int, batches_done: int) -> Optional[int]:
        """The version to publish after ``latest`` now that ``batches_done`` are done, if any."""
        nxt = latest + 1
        return nxt if batches_done >= self.publish_at(nxt) else None

    def probe_window(self, version: int) -> tuple[int, int]:
        """Global batches ``[start, stop)`` whose pools feed ``version``'s probes."""
        stop = self.publish_at(version)
        return max(0, stop - self.update_interval), stop

    # -- the probe log -----------------------------------------------------------------------

    @property
    def log_stride(self) -> int:
        """Every ``log_stride``-th global batch writes the probe log (0: no console, no log)."""
        return -(-2 * self.update_interval // self.log_slots) if self.update_interval else 0

    def log_slot(self, batch: int) -> Optional[int]:
        """The probe log slot of global batch ``batch``, or ``None`` off the stride."""
        stride = self.log_stride
        if stride <= 0 or batch % stride:
            return None
        return (batch // stride) % self.log_slots

    def logged_batches(self, start: int, stop: int) -> range:
        """The global batches in ``[start, stop)`` that write the probe log."""
        stride = self.log_stride
        if stride <= 0:
            return range(0)
        first = -(-max(start, 0) // stride) * stride
        return range(first, max(stop, first), stride)

    @staticmethod
    def log_quota(probe_pool: int, world: int, batches: int) -> int:
        """Candidates a rank takes from each of a window's ``batches`` logged batches."""
        return max(1, math.ceil(probe_pool / world / max(1, batches)))
