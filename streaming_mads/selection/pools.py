"""Where a pool sits in training: its batch numbers, its noise key, the candidates it logs.

Plain functions of integers, shared by the dataset's workers (which build pools), the console
(which reads what the workers logged) and the scale benchmark (which recomputes them for cluster
layouts it cannot run); a pool's global batch and weight version are the schedule's
(:mod:`streaming_mads.selection.schedule`). Everything here depends only on the pool's place in
the *global* order (epoch, batch within the epoch, rank), never on how many DataLoader workers or
nodes built it, which is what keeps selection and probes identical for any worker layout and on
resume.

Streaming deals the candidate batches (pools) of a rank round-robin over its DataLoader workers:
worker ``w`` of ``K`` builds the rank's batches ``w, w + K, w + 2K, ...`` of the epoch.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import NDArray

from streaming_mads.selection.scores import gumbel_noise

__all__ = ['batch_in_epoch', 'noise_key', 'log_positions', 'LOG_SALT']

LOG_SALT = 0x50524F4245  # 'PROBE': keeps the probe log's randomness apart from selection noise.


def batch_in_epoch(first_batch: int, pool: int, workers: int, worker: int) -> int:
    """The rank's batch number within the epoch of a worker's ``pool``-th pool.

    Args:
        first_batch (int): The rank's batch at which this iteration started (non-zero on resume).
        pool (int): Index of the pool among those this worker builds in this iteration.
        workers (int): DataLoader workers of the rank (1 when iterating in the main process).
        worker (int): This worker's index.
    """
    return first_batch + pool * workers + worker


def noise_key(seed: int, epoch: int, batch: int, rank: int, num_ranks: int) -> tuple[int, int, int]:
    """Key of a pool's Gumbel noise: the seed, the epoch and the pool's global index."""
    return (seed, epoch, batch * num_ranks + rank)


def log_positions(key: tuple[int, ...], valid: NDArray[np.bool_], width: int) -> NDArray[np.int64]:
    """Positions of the (at most ``width``) candidates of a pool written to the probe log.

    A uniform random subset of the pool's valid (non-padding) candidates, in random order (so any
    prefix of it is a uniform subset too), drawn by a hash of the pool's key salted apart from the
    selection noise, so whether a candidate is logged is independent of whether it is kept.

    Args:
        key (tuple[int, ...]): The pool's :func:`noise_key`.
        valid (NDArray[np.bool_]): Which positions hold real candidates.
        width (int): Most candidates to log.
    """
    rand = gumbel_noise(tuple(key) + (LOG_SALT,), len(valid))
    rand[~valid] = -np.inf
    k = min(int(width), int(valid.sum()))
    if k <= 0:
        return np.empty(0, np.int64)
    chosen = np.argpartition(-rand, k - 1)[:k] if k < len(rand) else np.arange(len(rand))
    return chosen[np.argsort(-rand[chosen], kind='stable')].astype(np.int64)
