"""From rewards to new weights: the console's update rule, as plain functions.

The rule is stated in ``docs/architecture.md`` ("The console's update").

Given the influence of each probe sample on the reference loss, one update:

1. standardises the rewards (gradient scale drifts over training; only the ranking matters),
2. moves each agent's memory by multiplicative weights on the mean reward of each label value
   (values with no probe keep their weight),
3. moves θ toward the agents whose *current* scores predicted this round's rewards best (Pearson
   correlation of ``ŝ_a`` with the rewards, measured before the memories learn from the same
   rewards, so an agent with many values cannot win by fitting noise),
4. returns the statistics the console logs.

Everything is deterministic numpy on gathered inputs, so every rank computes bit-identical weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from numpy.typing import NDArray

from streaming_mads.agents import mean_by_value, multiplicative_update
from streaming_mads.selection import standardized_log_weights

__all__ = [
    'standardize', 'predictiveness', 'update_theta', 'Update', 'update_weights',
    'stratified_probe'
]


def standardize(rewards: NDArray) -> NDArray[np.float64]:
    """``(r - mean) / std``; all zeros when the rewards are constant."""
    r = np.asarray(rewards, np.float64)
    std = r.std()
    return (r - r.mean()) / std if std > 1e-300 else np.zeros_like(r)


def predictiveness(scores: NDArray, z: NDArray) -> float:
    """Pearson correlation of an agent's scores with the rewards (0 if either is constant)."""
    s = np.asarray(scores, np.float64)
    s = s - s.mean()
    zc = np.asarray(z, np.float64) - np.mean(z)
    denom = np.sqrt(np.dot(s, s) * np.dot(zc, zc))
    return float(np.dot(s, zc) / denom) if denom > 1e-300 else 0.0


def update_theta(theta: NDArray, R: NDArray, lr: float, floor: float) -> NDArray[np.float64]:
    """``θ_a <- θ_a exp(lr (R_a - mean R))``, renormalised, every share at least ``floor``.

    Args:
        theta (NDArray): Current collaborative weights (sum 1).
        R (NDArray): Predictiveness of each agent this round.
        lr (float): Learning rate ``η_θ``.
        floor (float): Minimum share of each agent, ``0 <= floor <= 1/A``.
    """
    theta = np.asarray(theta, np.float64)
    a = len(theta)
    if not 0 <= floor * a <= 1:
        raise ValueError(f'theta_floor={floor} is impossible for {a} agents: use at most 1/{a}.')
    logits = np.log(theta) + lr * (np.asarray(R, np.float64) - np.mean(R))
    new = np.exp(logits - logits.max())
    new /= new.sum()
    # Mix with the floor only as much as needed, so θ never falls below it.
    low = new.min()
    if low < floor:
        mix = (floor - low) / (1.0 / a - low)
        new = (1 - mix) * new + mix / a
    return new / new.sum()


@dataclass
class Update:
    """Result of one update: new weights and what to log."""
    memories: list[NDArray[np.float64]]
    theta: NDArray[np.float64]
    predictiveness: NDArray[np.float64]
    value_rewards: list[NDArray[np.float64]]
    reward_mean: float
    reward_std: float


def update_weights(memories: Sequence[NDArray], theta: NDArray, freqs: Sequence[NDArray],
                   probe_label_ids: Sequence[NDArray], rewards: NDArray, *, lr_memory: float,
                   lr_theta: float, memory_floor: float, memory_cap: float,
                   theta_floor: float) -> Optional[Update]:
    """One console update (see ``docs/architecture.md``); ``None`` if any reward is NaN/inf.

    Args:
        memories (Sequence[NDArray]): Each agent's memory before the update.
        theta (NDArray): θ before the update.
        freqs (Sequence[NDArray]): Each agent's label value counts in the data (standardisation).
        probe_label_ids (Sequence[NDArray]): Each agent's label value id of every probe.
        rewards (NDArray): Influence of every probe on the reference loss.
        lr_memory (float): ``η`` of the memories.
        lr_theta (float): ``η_θ`` of θ.
        memory_floor (float): Smallest memory weight relative to the mean.
        memory_cap (float): Largest memory weight relative to the mean.
        theta_floor (float): Smallest θ share.
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.size == 0 or not np.all(np.isfinite(rewards)):
        return None
    z = standardize(rewards)
    R = np.array([
        predictiveness(standardized_log_weights(m, f)[ids], z)
        for m, f, ids in zip(memories, freqs, probe_label_ids)
    ])
    value_rewards = [mean_by_value(ids, z, len(m)) for m, ids in zip(memories, probe_label_ids)]
    new_memories = [
        multiplicative_update(m, r, lr_memory, memory_floor, memory_cap)
        for m, r in zip(memories, value_rewards)
    ]
    return Update(new_memories, update_theta(theta, R, lr_theta, theta_floor), R, value_rewards,
                  float(rewards.mean()), float(rewards.std()))


def stratified_probe(candidate_label_ids: Sequence[NDArray], agent_sizes: Sequence[int],
                     probe_size: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """Positions (into the candidates) of a probe set covering every label value it can.

    One turn per (agent, value) pair, each taking a not yet chosen candidate of that value, so
    every value of every agent present among the candidates is measured, including values
    the selector currently avoids (exploration); the rest is filled uniformly. Candidates are
    assumed to be a uniform random draw from the data.

    Args:
        candidate_label_ids (Sequence[NDArray]): Each agent's label ids of the candidates.
        agent_sizes (Sequence[int]): Number of values of each agent.
        probe_size (int): Probes wanted (at most the number of candidates).
        rng (np.random.Generator): Randomness for the order of turns and the fill.
    """
    n = len(candidate_label_ids[0])
    probe_size = min(probe_size, n)
    taken = np.zeros(n, bool)
    # One round over the (agent, value) pairs present, in random order: each takes the first
    # (random) candidate of its value not taken yet.
    firsts: list[NDArray[np.int64]] = []
    for ids, size in zip(candidate_label_ids, agent_sizes):
        firsts += [np.flatnonzero(ids == k) for k in range(size)]
    for q in rng.permutation(len(firsts)):
        free = firsts[q][~taken[firsts[q]]]
        if len(free) and taken.sum() < probe_size:
            taken[free[0]] = True
    rest = np.flatnonzero(~taken)
    fill = rng.choice(rest, size=probe_size - int(taken.sum()), replace=False)
    taken[fill] = True
    return np.flatnonzero(taken).astype(np.int64)
