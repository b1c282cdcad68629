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

That is the paper's rule (``rule: paper``). The ``evidence`` rule (:class:`Evidence`,
:func:`evidence_effects`) fits each agent's effects on every probe so far, as if it were
alone, gates each agent by the reliability of its effects and publishes θ = 1;
:func:`apply_rule` runs either. Rewards may be ranked or winsorised first
(:func:`transform_rewards`) against heavy-tailed influence.

Everything is deterministic numpy on gathered inputs; the console computes it on rank 0 and
broadcasts the result, so every rank holds the same bytes even on nodes whose math libraries
round differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
from numpy.typing import NDArray

from streaming_mads.selection.agents import Agent, normalize_clipped

__all__ = [
    'REWARDS', 'RULES', 'TRANSFORMS', 'standardize', 'transform_rewards', 'reward_signal',
    'one_hot', 'value_effects', 'predictiveness', 'update_theta', 'Update', 'update_weights',
    'Evidence', 'evidence_effects', 'apply_rule', 'stratified_probe', 'systematic_sample',
    'inclusion_probabilities'
]

#: Reward kinds: the raw influence ``⟨∇ℓ(x), ∇L_R⟩``, its cosine (divided by ``|∇ℓ(x)|``), or
#: the influence of an Adam step, ``⟨∇ℓ(x), P ∇L_R⟩`` (:mod:`streaming_mads.influence.preconditioning`).
REWARDS = ('inner', 'cosine', 'adam')

#: Update rules: the paper's (memories by multiplicative steps, θ shares moved by
#: predictiveness) or ``evidence`` (memories from accumulated evidence, gated by its reliability;
#: docs/architecture.md "The update rule").
RULES = ('evidence', 'paper')

#: Transforms of the rewards before the fit: plain standardisation (``none``), standardised ranks
#: (``rank``) or standardisation after clipping at :data:`WINSOR_MADS` robust deviations
#: (``winsorize``); the last two bound what one heavy-tailed influence can do.
TRANSFORMS = ('none', 'rank', 'winsorize')

#: Where ``winsorize`` clips: this many scaled median absolute deviations from the median.
WINSOR_MADS = 3.0

#: The gate's margin ``c``: an agent's gate is ``max(0, 1 - c · dof / T)``, ``T`` the Wald
#: statistic of its effects (``dof`` their degrees of freedom).
GATE_MARGIN = 1.0

#: Ridge of the θ regression (in units of the standardised scores' variance): keeps two agents
#: with identical scores solvable, splitting their credit equally.
THETA_RIDGE = 0.05


def standardize(rewards: NDArray) -> NDArray[np.float64]:
    """``(r - mean) / std``; all zeros when the rewards are constant."""
    r = np.asarray(rewards, np.float64)
    std = r.std()
    return (r - r.mean()) / std if std > 1e-300 else np.zeros_like(r)


def transform_rewards(rewards: NDArray, kind: str) -> NDArray[np.float64]:
    """The rewards on a common scale (mean 0, std 1), after the transform ``kind``.

    Per-sample influence is heavy-tailed (a garbled or very high-loss sample can have a gradient
    many times the others'), and one such probe can decide a whole update under plain
    standardisation (``none``). ``rank`` replaces each reward by its rank (ties share the mean
    rank), ``winsorize`` clips at ``median ± WINSOR_MADS · 1.4826 · MAD`` (the standard deviation
    when the MAD is 0); both are then standardised.

    Args:
        rewards (NDArray): Reward of every probe (finite).
        kind (str): One of :data:`TRANSFORMS`.
    """
    r = np.asarray(rewards, np.float64)
    if kind == 'none' or not len(r):
        return standardize(r)
    if kind == 'rank':
        values, inverse = np.unique(r, return_inverse=True)
        counts = np.bincount(inverse)
        mean_rank = np.cumsum(counts) - (counts - 1) / 2.0  # Ties share their mean rank.
        return standardize(mean_rank[inverse])
    if kind != 'winsorize':
        raise ValueError(f'Unknown reward_transform {kind!r}: use one of {list(TRANSFORMS)}.')
    median = np.median(r)
    scale = 1.4826 * np.median(np.abs(r - median))
    scale = scale if scale > 1e-300 else r.std()
    return standardize(np.clip(r, median - WINSOR_MADS * scale, median + WINSOR_MADS * scale))


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


def one_hot(label_ids: Sequence[NDArray], sizes: Sequence[int]) -> NDArray[np.float64]:
    """The probes' concatenated one-hot label values of every agent (a row per probe)."""
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    n = len(label_ids[0]) if len(label_ids) else 0
    design = np.zeros((n, int(offsets[-1])))
    rows = np.arange(n)
    for ids, off in zip(label_ids, offsets[:-1]):
        design[rows, off + np.asarray(ids, np.int64)] = 1.0
    return design


def _split(values: NDArray, sizes: Sequence[int]) -> list[NDArray[np.float64]]:
    """``values`` cut into one piece per agent."""
    return [values[lo:hi] for lo, hi in _bounds(sizes)]


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
    design = one_hot(label_ids, sizes)
    counts = design.sum(0)
    beta = np.linalg.lstsq(design, z, rcond=None)[0] * counts / (counts + prior)
    return _split(beta, sizes)


def predictiveness(scores: Sequence[NDArray], z: NDArray,
                   weights: Optional[NDArray] = None) -> NDArray[np.float64]:
    """How well each agent's current scores predict the rewards, jointly with the others.

    The standardised coefficients of a (lightly ridged, :data:`THETA_RIDGE`) regression of the
    standardised rewards on every agent's standardised scores of the probes. For one agent, or
    agents whose scores are uncorrelated, it is the Pearson correlation (shrunk by ``1 /
    (1 + THETA_RIDGE)``); when two agents' scores are correlated, each is credited only with
    what it predicts beyond the other. An agent whose scores are constant gets 0.

    A correlation is a statement about the data the loader reads, but stratified probes
    over-represent rare label values: ``weights`` (the inverse of each probe's inclusion
    probability, :func:`inclusion_probabilities`) make every mean, spread and product one over
    that data rather than over the probe set.

    Args:
        scores (Sequence[NDArray]): Each agent's score of every probe.
        z (NDArray): Standardised reward of every probe.
        weights (NDArray, optional): Positive weight of every probe. Defaults to equal weights.
    """
    z = np.asarray(z, np.float64)
    w = np.ones(len(z)) if weights is None else np.asarray(weights, np.float64)
    w = w / max(w.sum(), 1e-300)
    root = np.sqrt(w)
    cols = []
    for s in scores:
        s = np.asarray(s, np.float64)
        s = s - np.dot(w, s)
        std = np.sqrt(np.dot(w, s * s))
        cols.append(s / std if std > 1e-12 else np.zeros_like(s))
    design = np.stack(cols, 1) * root[:, None]
    zc = z - np.dot(w, z)
    zstd = np.sqrt(np.dot(w, zc * zc))
    target = zc / zstd if zstd > 1e-300 else zc
    return _ridge(design, target * root, THETA_RIDGE)


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
    """Result of one update: the new θ, each agent's value effects, and what to log.

    ``gates``: each agent's reliability in ``[0, 1]`` under the ``evidence`` rule (``None``
    under the paper's).
    """
    theta: NDArray[np.float64]
    predictiveness: NDArray[np.float64]
    value_rewards: list[NDArray[np.float64]]
    reward_mean: float
    reward_std: float
    gates: Optional[NDArray[np.float64]] = None


def update_weights(tables: Sequence[NDArray], theta: NDArray, probe_label_ids: Sequence[NDArray],
                   rewards: NDArray, *, lr_theta: float, theta_floor: float,
                   value_prior: float, weights: Optional[NDArray] = None,
                   transform: str = 'none') -> Optional[Update]:
    """One update of the paper's rule (see ``docs/architecture.md``); ``None`` if any reward is
    NaN/inf.

    Args:
        tables (Sequence[NDArray]): Each agent's score table as the selection used it (the
            published, repeat-penalised version's tables), before this round's update.
        theta (NDArray): θ before the update.
        probe_label_ids (Sequence[NDArray]): Each agent's label value id of every probe.
        rewards (NDArray): Reward of every probe (see :func:`reward_signal`).
        lr_theta (float): ``η_θ`` of θ.
        theta_floor (float): Smallest θ share.
        value_prior (float): Pseudo-probes of reward 0 per label value (:func:`value_effects`).
        weights (NDArray, optional): Inverse inclusion probability of every probe, for
            :func:`predictiveness`. Defaults to equal weights.
        transform (str): The reward transform, one of :data:`TRANSFORMS`. Defaults to ``'none'``.
    """
    rewards = np.asarray(rewards, np.float64)
    if rewards.size == 0 or not np.all(np.isfinite(rewards)):
        return None
    z = transform_rewards(rewards, transform)
    R = predictiveness([np.asarray(t)[ids] for t, ids in zip(tables, probe_label_ids)], z, weights)
    effects = value_effects(probe_label_ids, [len(t) for t in tables], z, value_prior)
    return Update(update_theta(theta, R, lr_theta, theta_floor), R, effects,
                  float(rewards.mean()), float(rewards.std()))


class Evidence:
    """What every update so far measured, as the sufficient statistics of each agent's own fit.

    The ``evidence`` rule estimates each label value's effect on the rewards from *all* probes
    so far (exponentially forgotten by ``decay`` per update, since what helps changes as the
    model trains), not from this update's 48: per label value of every agent the probe count
    ``counts = Σ γ^t n_k`` and reward sum ``moment = Σ γ^t Σ_{i∈k} z_i``, and overall ``square =
    Σ γ^t zᵀz`` and ``count = Σ γ^t n``. One number per label value and two in all, whatever the
    run's length; checkpointed by the console so a resumed run continues exactly.

    Args:
        sizes (Sequence[int]): Number of label values of each agent.
    """

    def __init__(self, sizes: Sequence[int]) -> None:
        self.sizes = [int(k) for k in sizes]
        total = sum(self.sizes)
        self.counts = np.zeros(total)
        self.moment = np.zeros(total)
        self.square = 0.0
        self.count = 0.0

    def add(self, probe_label_ids: Sequence[NDArray], z: NDArray, decay: float) -> None:
        """Forget by ``decay`` and add one update's probes (labels and transformed rewards)."""
        design = one_hot(probe_label_ids, self.sizes)
        z = np.asarray(z, np.float64)
        self.counts = decay * self.counts + design.sum(0)
        self.moment = decay * self.moment + design.T @ z
        self.square = decay * self.square + float(z @ z)
        self.count = decay * self.count + float(len(z))

    def state_dict(self) -> dict[str, Any]:
        """The statistics as plain lists (the console's checkpoint)."""
        return {'sizes': self.sizes, 'counts': self.counts.tolist(),
                'moment': self.moment.tolist(), 'square': self.square, 'count': self.count}

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> 'Evidence':
        """The evidence :meth:`state_dict` saved."""
        out = cls(state['sizes'])
        out.counts = np.asarray(state['counts'], np.float64)
        out.moment = np.asarray(state['moment'], np.float64)
        out.square, out.count = float(state['square']), float(state['count'])
        return out


def evidence_effects(evidence: Evidence, freqs: Sequence[NDArray],
                     prior: float) -> tuple[list[NDArray[np.float64]], NDArray[np.float64]]:
    """Each agent's accumulated value effects and its gate (reliability) in ``[0, 1]``.

    Per agent, from its own (marginal) fit of the accumulated evidence, as if it were the only
    agent: the effects are the mean reward per value ``β_k = moment_k / n_k``, centred over the
    data's label mix ``p`` (``β_c = β - p·β``); the residual noise ``σ² = RSS / (n - k)`` of that
    fit is estimated, not assumed (under pure noise the effects are only noise; another agent's
    signal counts as noise here); ``Cov β_c = C diag(σ² / n_k) Cᵀ`` (``C`` the centring). The
    gate is the positive-part James–Stein factor ``g = max(0, 1 - c · dof / T)`` of the Wald
    statistic ``T = β_cᵀ Cov(β_c)⁺ β_c`` (``dof`` its rank, ``c`` = :data:`GATE_MARGIN`): under
    pure noise ``T ~ χ²_dof``, so the gate is shut in most updates and barely ajar in the
    others, and an effect the probes carry makes ``T`` grow with every update, opening the gate
    toward 1. The effects are shrunk by their accumulated probe count, ``β_c n_k / (n_k +
    prior)``, as the paper's rule does per update. Each agent's memory therefore moves exactly
    as it would alone, whatever the other agents (why not a joint fit: docs/architecture.md
    "The evidence rule"). A value no probe had gets 0.

    Args:
        evidence (Evidence): The accumulated statistics.
        freqs (Sequence[NDArray]): Each agent's label value counts in the data.
        prior (float): ``value_prior``: pseudo-probes of reward 0 per value (``> 0``).
    """
    if not prior > 0:
        raise ValueError(f'value_prior must be > 0, got {prior}.')
    effects, gates = [], []
    for (lo, hi), freq in zip(_bounds(evidence.sizes), freqs):
        n, moment = evidence.counts[lo:hi], evidence.moment[lo:hi]
        seen = n > 0
        safe = np.where(seen, n, 1.0)
        beta = np.where(seen, moment / safe, 0.0)
        rss = max(evidence.square - float(np.sum(beta * moment)), 0.0)
        noise = rss / max(evidence.count - int(seen.sum()), 1.0)
        p = np.asarray(freq, np.float64)
        p = p / p.sum() if p.sum() > 0 else np.full(len(p), 1.0 / len(p))
        centre = np.eye(hi - lo) - p[None, :]  # β_c = β - p·β.
        b = centre @ beta
        cov = centre @ np.diag(np.where(seen, noise / safe, 0.0)) @ centre.T
        dof = int(np.linalg.matrix_rank(cov, hermitian=True)) if noise > 0 else 0
        wald = float(b @ np.linalg.pinv(cov, hermitian=True) @ b) if dof else 0.0
        gates.append(max(0.0, 1.0 - GATE_MARGIN * dof / wald) if wald > 0 else 0.0)
        effects.append(b * n / (n + prior))
    return effects, np.asarray(gates)


def _bounds(sizes: Sequence[int]) -> list[tuple[int, int]]:
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    return [(int(lo), int(hi)) for lo, hi in zip(offsets[:-1], offsets[1:])]


def apply_rule(agents: Sequence[Agent], theta: NDArray, probe_label_ids: Sequence[NDArray],
               rewards: NDArray, config: Any, *,
               selection_tables: Optional[Sequence[NDArray]] = None,
               probe_weights: Optional[NDArray] = None,
               evidence: Optional[Evidence] = None) -> Optional[Update]:
    """One update of ``config.rule``: moves the agents' memories, returns θ and what to log.

    The one place the console (on rank 0) and ``benchmarks/collaboration.py`` turn rewards into
    weights. ``paper``: :func:`update_weights`, then each agent's
    :meth:`~streaming_mads.selection.agents.Agent.update`. ``evidence``: the probes join
    ``evidence`` (:class:`Evidence`, forgotten by ``evidence_decay``), and each agent's memory
    becomes its prior moved by ``memory_strength`` times its gated effect (:func:`evidence_effects`,
    :meth:`~streaming_mads.selection.agents.Agent.settle`), with θ = 1 for every agent, so the
    agents add at full strength and one whose labels carry nothing stays at its prior. The
    predictiveness is computed under both rules (logged; it moves θ only under ``paper``).
    ``None`` (nothing moved) when a reward is NaN/inf or there is none.

    Args:
        agents (Sequence[Agent]): The dataset's agents (their memories are moved).
        theta (NDArray): θ before the update.
        probe_label_ids (Sequence[NDArray]): Each agent's label value id of every probe.
        rewards (NDArray): Reward of every probe.
        config (ConsoleConfig): The console's settings (rule, transform, rates, bounds); typed
            ``Any`` here because the config module imports this one.
        selection_tables (Sequence[NDArray], optional): The score tables the selection used for
            the probes' window; defaults to the agents' current score tables.
        probe_weights (NDArray, optional): Inverse inclusion probability of every probe.
        evidence (Evidence, optional): The accumulated evidence (``evidence`` rule only).
    """
    tables = selection_tables if selection_tables is not None else \
        [a.score_table() for a in agents]
    update = update_weights(tables, theta, probe_label_ids, rewards, lr_theta=config.lr_theta,
                            theta_floor=config.theta_floor, value_prior=config.value_prior,
                            weights=probe_weights, transform=config.reward_transform)
    if update is None:
        return None
    if config.rule == 'paper':
        for agent, effects in zip(agents, update.value_rewards):
            agent.update(effects, config.lr_memory, config.memory_floor, config.memory_cap)
        return update
    if evidence is None:
        raise ValueError('The evidence rule needs the accumulated Evidence.')
    evidence.add(probe_label_ids, transform_rewards(rewards, config.reward_transform),
                 config.evidence_decay)
    effects, gates = evidence_effects(evidence, [a.freq for a in agents], config.value_prior)
    for agent, effect, gate in zip(agents, effects, gates):
        agent.settle(gate * effect, config.memory_strength, config.memory_floor, config.memory_cap)
    update.theta, update.value_rewards, update.gates = np.ones(len(agents)), effects, gates
    return update


def stratified_probe(candidate_label_ids: Sequence[NDArray], agent_sizes: Sequence[int],
                     probe_size: int, rng: np.random.Generator) -> NDArray[np.int64]:
    """Positions (into the candidates) of a probe set that gives every label value an equal share.

    Draws with exactly the :func:`inclusion_probabilities` of the design (systematic sampling
    over the candidates in random order: ``probe_size`` distinct positions, each candidate
    drawn with its probability), so every label value of every agent present among the
    candidates gets ``probe_size / values`` probes in expectation (all of a value's candidates
    when it has fewer), including values the selector currently avoids (exploration).
    Candidates are assumed to be a uniform random draw from the data.

    Args:
        candidate_label_ids (Sequence[NDArray]): Each agent's label ids of the candidates.
        agent_sizes (Sequence[int]): Number of values of each agent.
        probe_size (int): Probes wanted (at most the number of candidates).
        rng (np.random.Generator): Randomness for the order and the start of the draw.
    """
    return systematic_sample(inclusion_probabilities(candidate_label_ids, agent_sizes, probe_size),
                             rng)


def systematic_sample(pi: NDArray[np.float64], rng: np.random.Generator) -> NDArray[np.int64]:
    """Sorted positions drawn with exactly the probabilities ``pi`` (each at most 1, summing to a
    whole number): systematic sampling over the positions in random order, so the draw holds
    exactly ``sum(pi)`` distinct positions.

    Args:
        pi (NDArray): Each position's inclusion probability (:func:`inclusion_probabilities`).
        rng (np.random.Generator): Randomness for the order and the start of the draw.
    """
    if not len(pi):
        return np.zeros(0, np.int64)
    order = rng.permutation(len(pi))
    cum = np.cumsum(pi[order])
    cum *= round(cum[-1]) / cum[-1]  # The design sums to a whole number of probes; no float drift.
    points = rng.random() + np.arange(round(cum[-1]))
    # Every candidate's interval has length pi <= 1, so it holds one point with chance pi
    # (unique: an interval that rounding stretched past 1 must not yield its candidate twice).
    return np.unique(order[np.searchsorted(cum, points, side='right')]).astype(np.int64)


def inclusion_probabilities(candidate_label_ids: Sequence[NDArray], agent_sizes: Sequence[int],
                            probe_size: int) -> NDArray[np.float64]:
    """Each candidate's chance of being drawn by :func:`stratified_probe`: the probe design.

    Equal allocation: every agent's ``probe_size`` probes are shared equally among its values
    present among the candidates (a value with fewer candidates than its share gives all of
    them, the rest is shared among the others), so a value holding 5% of the data is measured
    as often as one holding 50%: the console compares values, and a comparison is as precise
    as its rarest side (why: docs/architecture.md "Probes"). One probe counts for every agent,
    so the probabilities are raked (iterative proportional fitting) until each agent's values
    get their shares, then scaled to sum to ``probe_size`` with none above 1. The draw uses
    exactly these probabilities, so their inverse weights a probe back to the data the loader
    reads (:func:`predictiveness`).

    Args:
        candidate_label_ids (Sequence[NDArray]): Each agent's label ids of the candidates.
        agent_sizes (Sequence[int]): Number of values of each agent.
        probe_size (int): Probes drawn.
    """
    ids = [np.asarray(lab, np.int64) for lab in candidate_label_ids]
    n = len(ids[0])
    if n == 0:
        return np.zeros(0)
    m = min(int(probe_size), n)
    counts = [np.bincount(lab, minlength=size) for lab, size in zip(ids, agent_sizes)]
    shares = [_equal_shares(c, m) for c in counts]
    pi = np.full(n, m / n)
    for _ in range(_RAKING_ROUNDS):
        for lab, share, size in zip(ids, shares, agent_sizes):
            have = np.bincount(lab, weights=pi, minlength=size)
            pi = np.minimum(pi * (share / np.where(have > 0, have, 1.0))[lab], 1.0)
    # Scaled to sum m, none above 1: mean 1 with cap n / m (the floor is only there to bound the
    # search; no probability is near it).
    return np.minimum(normalize_clipped(pi, _FLOOR, n / m) * (m / n), 1.0)


#: Rounds of iterative proportional fitting behind the probe design (each agent's shares are
#: met to well under a probe after a few; the draw is exact for whatever the design is).
_RAKING_ROUNDS = 20
_FLOOR = 1e-300


def _equal_shares(counts: NDArray, total: int) -> NDArray[np.float64]:
    """``total`` split equally over the values with candidates, none above its ``counts``."""
    counts = np.asarray(counts, np.float64)
    share, open_ = np.zeros(len(counts)), counts > 0
    left = float(total)
    while open_.any():
        level = left / open_.sum()
        full = open_ & (counts <= level)
        if not full.any():
            share[open_] = level
            break
        share[full] = counts[full]
        left -= float(counts[full].sum())
        open_ &= ~full
    return share
