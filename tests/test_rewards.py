"""The console's update rule (`streaming_mads.console.rewards`) as plain functions."""

from __future__ import annotations

import numpy as np
import pytest

from streaming_mads.selection.agents import multiplicative_update
from streaming_mads.console.rewards import (THETA_RIDGE, predictiveness, reward_signal, standardize,
                                    stratified_probe, update_theta, update_weights, value_effects)
from streaming_mads.selection.scores import centred_log_weights


def test_standardize_and_reward_signal():
    np.testing.assert_array_equal(standardize(np.full(5, 3.0)), np.zeros(5))
    z = standardize(np.array([1.0, 2.0, 6.0]))
    assert abs(z.mean()) < 1e-12 and abs(z.std() - 1) < 1e-12
    inner, norms = np.array([2.0, -3.0, 1.0]), np.array([4.0, 1.0, 0.0])
    np.testing.assert_array_equal(reward_signal(inner, None, 'inner'), inner)
    np.testing.assert_allclose(reward_signal(inner, norms, 'cosine'), [0.5, -3.0, 0.0])
    with pytest.raises(ValueError, match='inner'):
        reward_signal(inner, norms, 'dot')
    with pytest.raises(ValueError, match='norms'):
        reward_signal(inner, None, 'cosine')


def test_value_effects_shrink_by_count():
    ids = np.array([0, 1, 1, 1, 1, 1, 1, 1, 1, 3])
    z = np.array([1.0, 1, 1, 1, 1, 1, 1, 1, 1, -2.0])
    (effects,) = value_effects([ids], [4], z, prior=4.0)
    np.testing.assert_allclose(effects, [1 / 5, 8 / 12, 0.0, -2 / 5])  # Σz / (n + prior).
    assert effects[2] == 0.0  # Unmeasured: no move.
    assert effects[1] > effects[0]  # Same mean reward, more probes: a larger move.
    with pytest.raises(ValueError, match='value_prior'):
        value_effects([ids], [4], z, prior=0.0)


def test_predictiveness_edge_cases():
    rng = np.random.default_rng(0)
    z = standardize(rng.normal(size=200))
    s = z + rng.normal(size=200)
    (r,) = predictiveness([s], z)
    assert r == pytest.approx(np.corrcoef(s, z)[0, 1] / (1 + THETA_RIDGE), rel=1e-9)
    assert predictiveness([np.ones(200)], z)[0] == 0.0  # Constant scores: no opinion.
    both = predictiveness([s, s.copy()], z)  # Identical agents split the credit.
    assert both[0] == pytest.approx(both[1]) and both[0] < r
    # Correlated agents: the one carrying the signal keeps the credit.
    decoy = s + 0.3 * rng.normal(size=200)
    real, fake = predictiveness([z + 0.5 * rng.normal(size=200), decoy - s + 0.1 * z], z)
    assert real > 0.5 and abs(fake) < real / 2


def test_update_theta_floor_and_learning_rate():
    theta = np.array([0.5, 0.3, 0.2])
    np.testing.assert_allclose(update_theta(theta, np.array([1.0, 0, -1]), 0.0, 0.05), theta)
    new = update_theta(theta, np.array([50.0, 0, -50]), 1.0, 0.05)
    assert new.min() >= 0.05 - 1e-12 and abs(new.sum() - 1) < 1e-12 and new.argmax() == 0
    with pytest.raises(ValueError, match='at most 1/3'):
        update_theta(theta, np.zeros(3), 1.0, 0.4)


def test_update_weights_skips_non_finite_and_empty_rewards():
    tables = [np.zeros(3)]
    ids = [np.array([0, 1, 2])]
    kwargs = dict(lr_theta=1.0, theta_floor=0.05, value_prior=4.0)
    assert update_weights(tables, np.ones(1), ids, np.array([1.0, np.nan, 0]), **kwargs) is None
    assert update_weights(tables, np.ones(1), ids, np.array([1.0, np.inf, 0]), **kwargs) is None
    assert update_weights(tables, np.ones(1), [np.zeros(0, int)], np.zeros(0), **kwargs) is None
    update = update_weights(tables, np.ones(1), ids, np.array([3.0, 1.0, 2.0]), **kwargs)
    assert update is not None and update.reward_mean == 2.0
    assert update.value_rewards[0].argmax() == 0


def test_stratified_probe_covers_every_present_value():
    rng = np.random.default_rng(1)
    n = 500
    domain = rng.choice(4, n, p=[0.9, 0.08, 0.019, 0.001])
    quality = rng.integers(0, 5, n)
    quality[rng.permutation(n)[:3]] = 5  # A rare sixth bin.
    for trial in range(20):
        chosen = stratified_probe([domain, quality], [4, 6], 24, np.random.default_rng(trial))
        assert len(chosen) == 24 == len(set(chosen.tolist()))
        assert set(domain[chosen]) == set(domain) and set(quality[chosen]) == set(quality)
    assert len(stratified_probe([domain, quality], [4, 6], 10_000, rng)) == n


def _run_console_rounds(rounds: int, seed: int) -> tuple[list[np.ndarray], np.ndarray, float]:
    """Rounds of the update rule on a corpus where only the domain carries the reward.

    Quality (the decoy) is strongly correlated with the domain: 60% of the good domain is top
    quality and 60% of the bad one bottom quality, so quality alone predicts the reward well. Returns the
    final memories (domain, quality, topic), θ and the decoy's marginal correlation with the
    reward in the population.
    """
    rng = np.random.default_rng(seed)
    n = 20_000
    domain = rng.choice(4, n, p=[0.3, 0.3, 0.3, 0.1])
    quality = np.where(rng.random(n) < 0.6, np.choose(domain, [4, 2, 2, 0]), rng.integers(0, 5, n))
    topic = rng.integers(0, 6, n)
    signal = np.choose(domain, [1.0, 0.0, 0.0, -2.0])
    labels, sizes = [domain, quality, topic], [4, 5, 6]
    freqs = [np.bincount(ids, minlength=k) for ids, k in zip(labels, sizes)]
    memories = [np.ones(k) for k in sizes]
    theta = np.full(3, 1 / 3)
    for _ in range(rounds):
        candidates = rng.choice(n, 2048, replace=False)
        chosen = candidates[stratified_probe([lab[candidates] for lab in labels], sizes, 48, rng)]
        rewards = signal[chosen] + rng.normal(size=len(chosen))
        tables = [centred_log_weights(m, f) for m, f in zip(memories, freqs)]
        update = update_weights(tables, theta, [lab[chosen] for lab in labels], rewards,
                                lr_theta=1.0, theta_floor=0.05, value_prior=4.0)
        assert update is not None
        memories = [multiplicative_update(m, e, 0.5, 0.05, 20.0)
                    for m, e in zip(memories, update.value_rewards)]
        theta = update.theta
    return memories, theta, float(np.corrcoef(quality, signal)[0, 1])


def test_credit_goes_to_the_agent_carrying_the_signal_not_a_correlated_decoy():
    memories, theta, decoy_corr = _run_console_rounds(rounds=25, seed=3)
    assert decoy_corr > 0.45  # The decoy really predicts the reward on its own.
    domain, quality, topic = (np.log(m) for m in memories)
    assert domain[0] > domain[1:].max() and domain[3] <= domain[1:3].min()
    spread = domain.max() - domain.min()
    # The decoy's memory does not follow its correlation: its "good" value (4, mostly the good
    # domain) is not ahead of its "bad" one (0, mostly the bad domain). Credit split between
    # correlated agents (a ridge fit) puts 4 about a whole domain spread above 0.
    assert abs(quality[4] - quality[0]) < 0.3 * spread
    assert quality.max() - quality.min() < 0.6 * spread
    assert topic.max() - topic.min() < 0.6 * spread
    assert theta[0] > 0.7 and theta[0] > 5 * max(theta[1], theta[2])
