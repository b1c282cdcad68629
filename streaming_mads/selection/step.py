"""The selection step of a DataLoader worker: what keeps ``B`` of each pool, in one place.

:func:`pool_selections` is the one implementation: the workers of
:class:`~streaming_mads.selection.dataset.MADSDataset` run it on their pools, and
``benchmarks/scale.py`` times it on pools of simulated cluster layouts. Per pool, in order:

1. **labels**: each agent's label value ids of the candidates (:func:`gather_label_ids`), read for
   :data:`BLOCK_POOLS` pools at a time in one vectorised gather from the memory-mapped sidecars;
2. **version**: the weight version of the pool's global batch (the
   :class:`~streaming_mads.selection.schedule.Schedule`) and its score tables ``θ_a ŝ_a``
   (:func:`version_tables`, cached per version by the caller);
3. **scores**: the combined score of each candidate, ``-inf`` for padding;
4. **keep**: Gumbel-top-k of ``B`` at temperature ``τ`` with the noise of the pool's key;
5. **record**: for a pool the trainer runs, the kept label values are counted on the board and a
   uniform subset of the candidates is written to the probe log.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence, Union

import numpy as np
from numpy.typing import NDArray

from streaming_mads.labels import LabelStore
from streaming_mads.selection.agents import Agent
from streaming_mads.selection.board import WeightBoard, Weights
from streaming_mads.selection.pools import log_positions, noise_key
from streaming_mads.selection.schedule import Schedule
from streaming_mads.selection.scores import combined_scores, gumbel_noise, gumbel_topk, score_tables

__all__ = ['BLOCK_POOLS', 'gather_label_ids', 'version_tables', 'pool_selections']

BLOCK_POOLS = 64  #: Pools whose labels are gathered in one vectorised read.


def gather_label_ids(store: LabelStore, agents: Sequence[Agent],
                     sample_ids: NDArray[np.int64]) -> list[NDArray[np.int64]]:
    """Each agent's label value id of global ``sample_ids`` (each column read once)."""
    ids = np.asarray(sample_ids, np.int64)
    raw: dict[str, NDArray] = {}
    out = []
    for agent in agents:
        if agent.column not in raw:
            raw[agent.column] = store.gather(agent.column, ids)
        out.append(agent.label_ids(raw[agent.column]))
    return out


def version_tables(agents: Sequence[Agent], weights: Weights) -> list[NDArray[np.float64]]:
    """Per-agent score tables ``θ_a ŝ_a`` of a weight version (each agent's
    :meth:`~streaming_mads.selection.agents.Agent.score_table` of the published memory).

    Raises:
        ValueError: A table holds NaN or ``+inf`` (a NaN score would read as padding, and a pool
            would keep nothing), naming the agent and the version. ``-inf`` (a memory weight of
            0) means never keep the value.
    """
    tables = score_tables([agent.score_table(m) for agent, m in zip(agents, weights.memories)],
                          weights.theta)
    for agent, table in zip(agents, tables):
        if np.any(np.isnan(table) | (table == np.inf)):
            raise ValueError(f'Agent {agent.name!r} scores weight version {weights.version} as '
                             f'{table.tolist()}: a score must be finite, or -inf for a value never '
                             f'kept. Its score_table or the published weights are wrong.')
    return tables


def pool_selections(sample_ids: NDArray[np.int64], batches: NDArray[np.int64],
                    ranks: Union[int, NDArray[np.int64]], epoch: int, *, pool: int, keep: int,
                    temperature: float, seed: int, num_ranks: int, schedule: Schedule,
                    label_ids: Callable[[NDArray[np.int64]], Sequence[NDArray[np.int64]]],
                    tables_for: Callable[[int, int], Sequence[NDArray[np.float64]]],
                    board: WeightBoard, row: int) -> Iterator[tuple[int, NDArray[np.int64]]]:
    """Select each pool of ``sample_ids``; yields its start and the kept positions, lazily.

    Lazy on purpose: a pool's weight version may be published only once the trainer has run the
    batches before it, so ``tables_for`` (which may wait for it) is called pool by pool.

    Args:
        sample_ids (NDArray[np.int64]): Consecutive pools of ``pool`` candidates (``-1``:
            padding; the last pool may be shorter).
        batches (NDArray[np.int64]): Each pool's batch within ``epoch`` (of its rank).
        ranks (int | NDArray[np.int64]): Each pool's rank, or the one rank of all of them.
        epoch (int): The epoch.
        pool (int): Candidates per pool, ``r·B``.
        keep (int): ``B``, kept per pool.
        temperature (float): ``τ`` of Gumbel-top-k.
        seed (int): The selection seed.
        num_ranks (int): Ranks of the run (the pool's noise key counts pools over all ranks).
        schedule (Schedule): The schedule, its ``batches_per_epoch`` set.
        label_ids (Callable): Global sample ids -> each agent's label ids (e.g.
            :func:`gather_label_ids`).
        tables_for (Callable): ``(version, global batch)`` -> the version's score tables.
        board (WeightBoard): Where kept counts and the probe log are written.
        row (int): The board's counter row of this worker.
    """
    batches = np.asarray(batches)
    ranks = np.broadcast_to(np.asarray(ranks), batches.shape)
    block = pool * BLOCK_POOLS
    for block_start in range(0, len(sample_ids), block):
        ids = np.asarray(sample_ids[block_start:block_start + block], np.int64)
        valid = ids >= 0
        labels = label_ids(np.where(valid, ids, 0))
        for start in range(0, len(ids), pool):
            j = (block_start + start) // pool
            b, rank = int(batches[j]), int(ranks[j])
            batch = schedule.pool_batch(epoch, b)
            tables = tables_for(schedule.version_for_batch(batch), batch)
            end = min(start + pool, len(ids))
            scores = combined_scores(tables, [lab[start:end] for lab in labels])
            scores[~valid[start:end]] = -np.inf
            key = noise_key(seed, epoch, b, rank, num_ranks)
            kept = gumbel_topk(scores, gumbel_noise(key, end - start), keep, temperature)
            if schedule.counted(b):
                board.record_kept(row, [lab[start + kept] for lab in labels])
                logged = log_positions(key, valid[start:end], board.log_width)
                board.write_log(batch, ids[start + logged])
            yield block_start + start, kept
