"""From rewards to new weights: the console's update rule, as plain functions.

The rule is stated in ``docs/architecture.md`` ("The console's update").

Given the influence of each probe sample on the reference loss, one update:

1. standardises the rewards (gradient scale drifts over training; only the ranking matters),
2. estimates each label value's effect on the reward jointly over all agents
   (:func:`value_effects`: a least-squares fit of the rewards on every agent's one-hot label
   values, each effect then shrunk by its probe count as if ``value_prior`` probes of reward 0
   were added, so a value seen in one probe moves far less than one seen in twenty). Fitting
   the agents jointly gives each agent only the effect its label carries *beyond* the others',
   so an agent whose labels are merely correlated with another's (low quality is mostly
   ``garbled``) gets no systematic credit; and a fit on the labels stays unbiased although the
   stratified probe set over-represents rare values (its sampling depends only on the labels),
3. moves θ toward the agents whose *current* scores predict this round's rewards, jointly
   (:func:`predictiveness`: standardised partial regression coefficients, measured before the
   memories learn from the same rewards, so an agent with many values cannot win by fitting
   noise, and correlated agents do not both take the credit of one),
4. returns the statistics the console logs; each agent then moves its own memory from its
   value effects (:meth:`streaming_mads.selection.agents.Agent.update`).

Everything is deterministic numpy on gathered inputs; the console computes it on rank 0 and
broadcasts the result, so every rank holds the same bytes even on nodes whose math libraries
round differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
from numpy.typing import NDArray

__all__ = [
    'REWARDS', 'standardize', 'reward_signal', 'value_effects', 'predictiveness', 'update_theta',
    'Update', 'update_weights', 'stratified_probe'
]

#: Reward kinds: the raw influence ``⟨∇ℓ(x), ∇L_R⟩``, its cosine (divided by ``|∇ℓ(x)|``), or
#: the influence of an Adam step, ``⟨∇ℓ(x), P ∇L_R⟩`` (:mod:`streaming_mads.influence.preconditioning`).
REWARDS = ('inner', 'cosine', 'adam')

#: Ridge of the θ regression (in units of the standardised scores' variance): keeps two agents
#: with identical scores solvable, splitting their credit equally.
THETA_RIDGE = 0.05


def standardize(rewards: NDArray) -> NDArray[np.float64]:
    """``(r - mean) / std``; all zeros when the rewards are constant."""
    r = np.asarray(rewards, np.float64)
    std = r.std()
    return (r - r.mean()) / std if std > 1e-300 else np.zeros_like(r)


def reward_signal(inner: NDArray, grad_norms: Optional[NDArray], kind: str) -> NDArray[np.float64]:
    """The reward of each probe from its influence: ``inner``, or ``cosine`` (``inner / |∇ℓ|``).

    A raw inner product is dominated by samples with large gradients (high-loss, garbled text);
    the cosine measures only the direction a sample pushes the model. (The reference gradient's
    norm is common to all probes and cancels in :func:`standardize`.) A zero-norm probe gets 0.
    ``adam`` is the inner product taken with the preconditioned reference gradient, so here it
    is ``inner`` as given.

    Args:
        inner (NDArray): ``⟨∇ℓ(x), ∇L_R⟩`` per probe.
        grad_norms (NDArray, optional): ``|∇ℓ(x)|`` per probe (needed for ``cosine``).
        kind (str): One of :data:`REWARDS`.
    """
    inner = np.asarray(inner, np.float64)
    if kind in ('inner', 'adam'):
        return inner
    if kind != 'cosine':
        raise ValueError(f'Unknown reward {kind!r}: use one of {list(REWARDS)}.')
    if grad_norms is None:
        raise ValueError('The cosine reward needs the probes\' gradient norms.')
    norms = np.asarray(grad_norms, np.float64)
    with np.errstate(invalid='ignore', divide='ignore'):
        return np.where(norms > 0, inner / np.where(norms > 0, norms, 1.0), 0.0)


def _ridge(design: NDArray, z: NDArray, penalty: float) -> NDArray[np.float64]:
    """``argmin |z - X b|² + penalty |b|²`` (the normal equations are tiny: one row per agent)."""
    gram = design.T @ design + penalty * np.eye(design.shape[1])
    return np.linalg.solve(gram, design.T @ z)


def value_effects(label_ids: Sequence[NDArray], sizes: Sequence[int], z: NDArray,
                  prior: float) -> list[NDArray[np.float64]]:
    """Each agent's estimated reward per label value, fitted jointly over all agents.

    A least-squares fit of ``z`` on the concatenated one-hot label values of every agent (the
    minimum-norm solution, since each agent's columns sum to the same intercept), so each agent
    gets the part of the reward its labels explain *beyond* the others' (an agent merely
    correlated with another gets no systematic credit), and, since probes are stratified on
    labels only, the fit is not biased by the over-represented rare values. Each estimate is
    then shrunk toward 0 by its probe count, ``β_k · n_k / (n_k + prior)``: with one agent the
    estimate is ``Σ_{i∈k} z_i / (n_k + prior)``, so a value seen in one probe moves far less than
    one seen in twenty. (Shrinking after the fit, not with a ridge penalty inside it, keeps a
    rare value's effect from leaking into the values correlated with it.) A value no probe had
    gets exactly 0.

    Args:
        label_ids (Sequence[NDArray]): Each agent's label value id of every probe.
        sizes (Sequence[int]): Number of values of each agent.
        z (NDArray): Standardised reward of every probe.
        prior (float): ``value_prior``: pseudo-probes of reward 0 per value (``> 0``).
    """
    if not prior > 0:
        raise ValueError(f'value_prior must be > 0, got {prior}.')
    z = np.asarray(z, np.float64)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    design = np.zeros((len(z), int(offsets[-1])))
    rows = np.arange(len(z))
    for ids, off in zip(label_ids, offsets[:-1]):
        design[rows, off + np.asarray(ids, np.int64)] = 1.0
    counts = design.sum(0)
    beta = np.linalg.lstsq(design, z, rcond=None)[0] * counts / (counts + prior)
    return [beta[lo:hi] for lo, hi in zip(offsets[:-1], offsets[1:])]


def predictiveness(scores: Sequence[NDArray], z: NDArray) -> NDArray[np.float64]:
    """How well each agent's current scores predict the rewards, jointly with the others.

    The standardised coefficients of a (lightly ridged, :data:`THETA_RIDGE`) regression of the
    standardised rewards on every agent's standardised scores of the probes. For one agent, or
    agents whose scores are uncorrelated, it is the Pearson correlation (shrunk by ``1 /
    (1 + THETA_RIDGE)``); when two agents' scores are correlated, each is credited only with
    what it predicts beyond the other. An agent whose scores are constant gets 0.

    Args:
        scores (Sequence[NDArray]): Each agent's score of every probe.
        z (NDArray): Standardised reward of every probe.
    """
    z = np.asarray(z, np.float64)
    n = max(len(z), 1)
    cols = []
    for s in scores:
        s = np.asarray(s, np.float64) - np.mean(s)
        std = np.sqrt(np.dot(s, s) / n)
        cols.append(s / std if std > 1e-12 else np.zeros_like(s))
    design = np.stack(cols, 1) / np.sqrt(n)
    return _ridge(design, (z - z.mean()) / np.sqrt(n), THETA_RIDGE)
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
    """Result of one update: the new θ, each agent's value effects, and what to log."""
    theta: NDArray[np.float64]
    predictiveness: NDArray[np.float64]
    value_rewards: list[NDArray[np.float64]]
    reward_mean: float
    reward_std: float


def update_weights(tables: Sequence[NDArray], theta: NDArray, probe_label_ids: Sequence[NDArray],
                   rewards: NDArray, *, lr_theta: float, theta_floor: float,
                   value_prior: float) -> Optional[Update]:
    """One console update (see ``docs/architecture.md``); ``None`` if any reward is NaN/inf.

    Args:
        tables (Sequence[NDArray]): Each agent's current score table ``ŝ_a`` (its
            :meth:`~streaming_mads.selection.agents.Agent.score_table`), before this round's update.
        theta (NDArray): θ before the update.
        probe_label_ids (Sequence[NDArray]): Each agent's label value id of every probe.
        rewards (NDArray): Reward of every probe (see :func:`reward_signal`).
        lr_theta (float): ``η_θ`` of θ.
        theta_floor (float): Smallest θ share.
        value_prior (float): Pseudo-probes of reward 0 per label value (:func:`value_effects`).
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.size == 0 or not np.all(np.isfinite(rewards)):
        return None
    z = standardize(rewards)
    R = predictiveness([np.asarray(t)[ids] for t, ids in zip(tables, probe_label_ids)], z)
    effects = value_effects(probe_label_ids, [len(t) for t in tables], z, value_prior)
    return Update(update_theta(theta, R, lr_theta, theta_floor), R, effects,
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
