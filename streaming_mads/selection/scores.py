"""Selection math: agent scores, the combined score, and seeded Gumbel-top-k over a pool.

Every function here is a plain function on numpy arrays, so it is shared verbatim by the dataset
(which selects) and by tests and the console (which reason about what was selected).

Scores are lookup tables: an agent's score depends only on the label value of a sample, so for
each weight version every agent's memory becomes a table ``θ_a · ŝ_a[k]`` once (the agent's
:meth:`~streaming_mads.selection.agents.Agent.score_table`, by default :func:`centred_log_weights`), and a
pool's combined scores are a sum of table gathers.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
from numpy.typing import NDArray

__all__ = [
    'centred_log_weights', 'score_tables', 'combined_scores', 'simulate_keep', 'repeat_penalized',
    'gumbel_noise', 'gumbel_topk'
]

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def centred_log_weights(weights: NDArray, freq: NDArray) -> NDArray[np.float64]:
    """An agent's score table ``ŝ[k] = log w[k] - Σ_j p_j log w[j]``, ``p`` the data's label mix.

    The score is the memory's log-weight, centred over how often each label value occurs in the
    data, and *not* divided by its spread: a memory that learned little (``[1, 1 + 1e-9]``)
    scores every value near 0 and selects near uniformly, and the selection sharpens only as the
    memory's contrast grows, so ``lr_memory``, ``memory_floor`` and ``memory_cap`` bound how hard
    the dataset selects. With one agent at temperature ``τ = 1`` a candidate is kept with odds
    proportional to its value's weight ``w[k]``; ``τ`` is the one knob for sharpness. Centring
    makes the average candidate score 0, so agents add without shifting each other.

    Args:
        weights (NDArray): Positive memory weights, one per label value.
        freq (NDArray): Non-negative counts or frequencies of each label value in the data.
    """
    logw = np.log(np.asarray(weights, np.float64))
    p = np.asarray(freq, np.float64)
    total = p.sum()
    p = p / total if total > 0 else np.full_like(p, 1.0 / max(len(p), 1))
    return logw - float(np.dot(p, logw))


def score_tables(tables: Sequence[NDArray], theta: NDArray) -> list[NDArray[np.float64]]:
    """Per-agent tables ``θ_a · ŝ_a[k]``; a sample's combined score is the sum of its entries.

    With θ summing to 1 the combined score is the log of a weighted geometric mean of the
    agents' (centred) weights of the sample's values.
    """
    return [float(t) * np.asarray(table, np.float64) for table, t in zip(tables, theta)]


def simulate_keep(scores: NDArray, pool_size: int, keep: int, temperature: float,
                  key: Sequence[int], pools: int = 256) -> NDArray[np.float64]:
    """Times each candidate is kept when pools drawn from ``scores`` go through the selection.

    The candidates are a uniform draw of what the loader dealt; ``pools`` pools of
    ``pool_size`` are drawn from them with replacement and each keeps ``keep`` by
    :func:`gumbel_topk`, so the within-pool competition (a favoured value is capped by how many
    of its candidates a pool holds) is reproduced exactly rather than approximated. Seeded by
    ``key``: the same numbers on every rank. Used to estimate how many samples of each label
    value the loader kept, without counting in the workers (the console's repeat penalty).

    Args:
        scores (NDArray): Combined score of each candidate.
        pool_size (int): Candidates per pool.
        keep (int): Kept per pool.
        temperature (float): ``τ >= 0`` of the selection.
        key (Sequence[int]): Seed words.
        pools (int): Simulated pools. Defaults to ``256``.
    """
    s = np.asarray(scores, np.float64)
    kept = np.zeros(len(s))
    if not len(s):
        return kept
    members = np.random.default_rng(list(key)).integers(0, len(s), (pools, pool_size))
    for j, idx in enumerate(members):
        chosen = gumbel_topk(s[idx], gumbel_noise(tuple(key) + (j,), pool_size), keep, temperature)
        np.add.at(kept, idx[chosen], 1.0)
    return kept


def repeat_penalized(memory: NDArray, exhaustion: NDArray, rate: float) -> NDArray[np.float64]:
    """Memory weights divided by ``1 + rate · e_k``, ``e_k`` the times each sample of value ``k``
    was kept on average so far: the paper's ``score / (1 + 0.1 · count)`` per label value."""
    return np.asarray(memory, np.float64) / (1.0 + rate * np.asarray(exhaustion, np.float64))


def combined_scores(tables: Sequence[NDArray], label_ids: Sequence[NDArray]) -> NDArray[np.float64]:
    """``S(x) = Σ_a θ_a ŝ_a(ℓ_a(x))`` for candidates whose per-agent label ids are given."""
    if not tables:
        raise ValueError('combined_scores needs at least one agent.')
    out = np.zeros(len(label_ids[0]), np.float64)
    for table, ids in zip(tables, label_ids):
        out += table[ids]
    return out


def _splitmix64(x: NDArray[np.uint64]) -> NDArray[np.uint64]:
    # Counter-based mixing (splitmix64 finaliser), vectorised; uint64 arithmetic wraps.
    with np.errstate(over='ignore'):
        x = (x + np.uint64(0x9E3779B97F4A7C15)) & _MASK64
        x = ((x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _MASK64
        x = ((x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _MASK64
        return x ^ (x >> np.uint64(31))


def _splitmix64_int(x: int) -> int:
    # The same finaliser on one Python int: folding a pool's key costs no array allocations.
    m = 0xFFFFFFFFFFFFFFFF
    x = (x + 0x9E3779B97F4A7C15) & m
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & m
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & m
    return x ^ (x >> 31)


def gumbel_noise(key: Sequence[int], size: int) -> NDArray[np.float64]:
    """Standard Gumbel noise for positions ``0..size-1`` of the pool identified by ``key``.

    The noise is a pure function of ``(key, position)`` (a counter-based hash, no generator
    state), so any worker, on any rank, after any resumption draws the same noise for the same
    pool, and drawing it costs no per-pool generator construction.

    Args:
        key (Sequence[int]): Non-negative integers identifying the pool, e.g.
            ``(seed, epoch, pool_index)``.
        size (int): Number of candidates in the pool.
    """
    h = 0x6A09E667F3BCC909
    for k in key:
        h = _splitmix64_int(h ^ (int(k) & 0xFFFFFFFFFFFFFFFF))
    bits = _splitmix64(np.arange(size, dtype=np.uint64) ^ np.uint64(h))
    # 53 random bits, centred in their interval so u is never 0 or 1.
    u = ((bits >> np.uint64(11)).astype(np.float64) + 0.5) * (1.0 / (1 << 53))
    return -np.log(-np.log(u))


def gumbel_topk(scores: NDArray, noise: NDArray, k: int, temperature: float) -> NDArray[np.int64]:
    """Positions of the ``k`` candidates kept by Gumbel-top-k on ``scores / temperature``.

    With ``temperature > 0`` this samples ``k`` candidates without replacement with probability
    proportional to ``exp(score / temperature)`` (Plackett-Luce). With ``temperature == 0`` it is
    the hard top-k, ties broken by the noise so equal scores are still chosen uniformly.
    Candidates scored ``-inf`` (padding) are never kept. Returned positions are ascending, which
    keeps the kept samples in Streaming's shard-local order.

    Args:
        scores (NDArray): Combined score per candidate.
        noise (NDArray): Gumbel noise per candidate (see :func:`gumbel_noise`).
        k (int): How many to keep (at most the number of finite scores are kept).
        temperature (float): ``τ >= 0``.
    """
    valid = np.isfinite(scores)
    k = min(int(k), int(valid.sum()))
    if k <= 0:
        return np.empty(0, np.int64)
    if temperature > 0:
        keys = np.where(valid, scores / temperature + noise, -np.inf)
        if k == len(keys):
            chosen = np.arange(len(keys))
        else:
            chosen = np.argpartition(-keys, k - 1)[:k]
    else:
        order = np.lexsort((-noise, -np.where(valid, scores, -np.inf)))
        chosen = order[:k]
    return np.sort(chosen).astype(np.int64)
