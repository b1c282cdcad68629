"""The collaboration rule: gates and evidence, robust rewards, θ credited on what selected, and
looser versions of benchmarks/collaboration.py's goals on few seeds."""

from __future__ import annotations

import os
import sys
from dataclasses import replace

import numpy as np
import pytest

from streaming_mads.console.config import ConsoleConfig
from streaming_mads.console.rewards import (Evidence, apply_rule, evidence_effects,
                                            inclusion_probabilities, stratified_probe,
                                            transform_rewards)
from streaming_mads.selection.agents import CategoricalAgent

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                'benchmarks'))
import collaboration  # noqa: E402


def _agent(name: str, freq: list[int]) -> CategoricalAgent:
    """A categorical agent bound to label counts ``freq`` (what ``bind`` reads from labels)."""
    agent = CategoricalAgent(name, name)
    agent._reset([f'{name}{k}' for k in range(len(freq))], np.asarray(freq))
    return agent


def _rounds(signal: np.ndarray, rounds: int, seed: int, rule: str):
    """``rounds`` updates of ``rule`` on two agents of 6 values; only agent 0's value carries
    ``signal`` (pure noise when it is all zero). Returns the agents and the last update."""
    rng = np.random.default_rng(seed)
    agents = [_agent('informative', [100] * 6), _agent('noise', [100] * 6)]
    config = ConsoleConfig(rule=rule, lr_memory=1.0)
    evidence = Evidence([6, 6])
    theta = np.ones(2) if rule == 'evidence' else np.full(2, 0.5)
    update = None
    for _ in range(rounds):
        labels = [rng.integers(0, 6, 48), rng.integers(0, 6, 48)]
        rewards = signal[labels[0]] + rng.normal(size=48)
        update = apply_rule(agents, theta, labels, rewards, config, evidence=evidence)
        theta = update.theta
    return agents, update


def _spread(agent) -> float:
    logw = np.log(agent.memory)
    return float(logw.max() - logw.min())


def test_evidence_keeps_an_uninformative_memory_flat_and_grows_an_informative_one():
    signal = np.array([0.8, 0, 0, 0, 0, -0.8])
    flat = np.zeros(6)
    spreads = {rule: [[_spread(a) for a in _rounds(signal, 8, seed, rule)[0]] for seed in range(6)]
               for rule in ('paper', 'evidence')}
    noise_only = [_spread(_rounds(flat, 8, seed, 'evidence')[0][0]) for seed in range(6)]
    evidence, paper = np.array(spreads['evidence']), np.array(spreads['paper'])
    # Under the paper's rule the noise agent's memory moves by standardised noise at every
    # step; under the evidence rule it stays near flat.
    assert np.median(paper[:, 1]) > 0.5
    assert np.median(evidence[:, 1]) < 0.25 * np.median(paper[:, 1])
    assert np.median(noise_only) < 0.2
    # The informative agent's memory grows, its best value first and its worst last.
    assert np.median(evidence[:, 0]) > 2.0
    agents, update = _rounds(signal, 8, 0, 'evidence')
    assert agents[0].memory.argmax() == 0 and agents[0].memory[5] == agents[0].memory.min()
    assert update.gates[0] > 0.5 and update.gates[1] < update.gates[0]
    np.testing.assert_array_equal(update.theta, [1.0, 1.0])  # The agents add at full strength.


def test_gate_opens_with_evidence_and_stays_shut_under_noise():
    rng = np.random.default_rng(1)
    freqs = [np.full(4, 50), np.full(5, 40)]
    signal = np.array([0.5, 0, 0, -0.5])
    opened, shut = [], []
    for trial in range(40):
        evidence = Evidence([4, 5])
        gates_over_time = []
        for _ in range(10):
            labels = [rng.integers(0, 4, 48), rng.integers(0, 5, 48)]
            evidence.add(labels, signal[labels[0]] + rng.normal(size=48), decay=1.0)
            gates_over_time.append(evidence_effects(evidence, freqs, prior=4.0)[1])
        g = np.array(gates_over_time)
        opened.append(g[-1, 0])
        shut.append(g[:, 1].mean())
    assert np.median(opened) > 0.7  # 480 probes: a real effect is trusted.
    assert np.mean(shut) < 0.15  # Pure noise: shut most of the time, and ajar at most.
    empty = evidence_effects(Evidence([4, 5]), freqs, prior=4.0)
    assert np.all(empty[1] == 0) and all(np.all(e == 0) for e in empty[0])


def test_evidence_moves_each_agent_as_it_would_alone():
    # The same probes and rewards, once with the informative agent alone and once beside two
    # agents whose labels carry nothing: its memory and gate are the same, since each agent's
    # effects, noise and gate come from its own fit.
    rng = np.random.default_rng(8)
    signal = np.array([0.6, 0.2, 0, 0, -0.3, -0.5])
    alone = [_agent('informative', [100] * 6)]
    among = [_agent('informative', [100] * 6), _agent('noise', [50, 150, 100]),
             _agent('other', [100] * 8)]
    config = ConsoleConfig(rule='evidence')
    evidence_alone, evidence_among = Evidence([6]), Evidence([6, 3, 8])
    for _ in range(6):
        labels = [rng.integers(0, 6, 48), rng.integers(0, 3, 48), rng.integers(0, 8, 48)]
        rewards = signal[labels[0]] + rng.normal(size=48)
        one = apply_rule(alone, np.ones(1), labels[:1], rewards, config, evidence=evidence_alone)
        three = apply_rule(among, np.ones(3), labels, rewards, config, evidence=evidence_among)
        np.testing.assert_allclose(among[0].memory, alone[0].memory, rtol=1e-12)
        assert abs(three.gates[0] - one.gates[0]) < 1e-12
    assert one.gates[0] > 0.5 and _spread(alone[0]) > 1.0  # It did learn.


def test_evidence_state_round_trips():
    rng = np.random.default_rng(2)
    evidence = Evidence([3, 2])
    evidence.add([rng.integers(0, 3, 20), rng.integers(0, 2, 20)], rng.normal(size=20), 0.9)
    copy = Evidence.from_state(evidence.state_dict())
    np.testing.assert_array_equal(copy.counts, evidence.counts)
    np.testing.assert_array_equal(copy.moment, evidence.moment)
    assert (copy.square, copy.count, copy.sizes) == (evidence.square, evidence.count, [3, 2])


def test_reward_transforms_bound_heavy_tails():
    rng = np.random.default_rng(3)
    clean = rng.normal(size=200)
    heavy = clean.copy()
    heavy[7] = 1e4  # One garbled probe.
    for kind in ('none', 'rank', 'winsorize'):
        z = transform_rewards(heavy, kind)
        assert abs(z.mean()) < 1e-9 and abs(z.std() - 1) < 1e-9
    # Plain standardisation lets the one probe flatten every other reward; rank and winsorize
    # keep their order and spread.
    others = np.arange(200) != 7
    assert np.corrcoef(transform_rewards(heavy, 'none')[others], clean[others])[0, 1] > 0.99
    assert transform_rewards(heavy, 'none')[others].std() < 0.1
    for kind in ('rank', 'winsorize'):
        assert transform_rewards(heavy, kind)[others].std() > 0.9
    ranks = transform_rewards(np.array([3.0, 1.0, 1.0, 2.0]), 'rank')
    assert ranks[1] == ranks[2] and ranks[0] > ranks[3] > ranks[1]  # Ties share their rank.
    np.testing.assert_array_equal(transform_rewards(np.full(5, 2.0), 'winsorize'), np.zeros(5))
    with pytest.raises(ValueError, match=r"reward_transform 'log'.*none.*rank.*winsorize"):
        transform_rewards(clean, 'log')


def test_inclusion_probabilities_match_the_stratified_draw():
    rng = np.random.default_rng(4)
    n = 600
    labels = [rng.choice(5, n, p=[0.6, 0.2, 0.1, 0.07, 0.03]), rng.choice(3, n, p=[0.8, 0.15, 0.05])]
    hits = np.zeros(n)
    trials = 1500
    for t in range(trials):
        chosen = stratified_probe(labels, [5, 3], 24, np.random.default_rng(t))
        assert len(chosen) == 24 == len(set(chosen.tolist()))
        hits[chosen] += 1
    pi = inclusion_probabilities(labels, [5, 3], 24)
    assert abs(pi.sum() - 24) < 1e-9 and pi.max() <= 1.0
    # Equal allocation: every value of each agent gets the same expected number of probes,
    # so a value of 3% of the candidates is measured as often as one of 60%.
    np.testing.assert_allclose(np.bincount(labels[0], weights=pi), 24 / 5, rtol=0.02)
    np.testing.assert_allclose(np.bincount(labels[1], weights=pi), 24 / 3, rtol=0.02)
    # The draw follows the design, per (value, value) cell.
    for a in range(5):
        for b in range(3):
            cell = (labels[0] == a) & (labels[1] == b)
            if cell.sum() >= 3:
                empirical = hits[cell].mean() / trials
                assert abs(pi[cell].mean() - empirical) < 0.1 * empirical + 0.005, (a, b)
    assert pi.max() > 10 * pi.min()
    # A value with fewer candidates than its share gives all of them.
    few = labels[0].copy()
    few[np.flatnonzero(few == 4)[2:]] = 0
    pi_few = inclusion_probabilities([few, labels[1]], [5, 3], 24)
    np.testing.assert_allclose(pi_few[few == 4], 1.0)


def test_theta_is_credited_on_the_tables_selection_used():
    # Agent 0's own memory ranks its values the wrong way round, but what the loader selected
    # with (the published, repeat-penalised tables) ranks them right: θ follows the latter.
    rng = np.random.default_rng(5)
    agents = [_agent('a', [100] * 4), _agent('b', [100] * 4)]
    agents[0].memory = np.array([0.2, 0.5, 1.0, 2.3])
    labels = [rng.integers(0, 4, 200), rng.integers(0, 4, 200)]
    rewards = -labels[0] + rng.normal(size=200)
    published = [agents[0].score_table(np.array([2.3, 1.0, 0.5, 0.2])), agents[1].score_table()]
    config = ConsoleConfig(rule='paper', lr_theta=1.0, lr_memory=0.0)
    used = apply_rule(agents, np.full(2, 0.5), labels, rewards, config, selection_tables=published)
    own = apply_rule(agents, np.full(2, 0.5), labels, rewards, config)
    assert used.predictiveness[0] > 0.5 and used.theta[0] > 0.5
    assert own.predictiveness[0] < -0.5 and own.theta[0] < 0.5


def test_weighted_predictiveness_undoes_the_stratification():
    # The reward follows agent 0's rare value; stratified probes over-represent it 10 times.
    # Weighted by inverse inclusion, the correlation is the population's.
    rng = np.random.default_rng(6)
    n = 20_000
    value = (rng.random(n) < 0.02).astype(np.int64)
    reward = value * 3.0 + rng.normal(size=n)
    population = np.corrcoef(value, reward)[0, 1]
    probes = np.concatenate([rng.choice(np.flatnonzero(value == 1), 100),
                             rng.choice(np.flatnonzero(value == 0), 400)])
    weights = np.where(value[probes] == 1, 0.02 / 0.2, 0.98 / 0.8)
    from streaming_mads.console.rewards import predictiveness, standardize
    z = standardize(reward[probes])
    plain = predictiveness([value[probes].astype(float)], z)[0]
    weighted = predictiveness([value[probes].astype(float)], z, weights)[0]
    assert abs(weighted * 1.05 - population) < 0.06 < abs(plain * 1.05 - population)


def test_settings_are_checked_at_construction():
    with pytest.raises(ValueError, match=r"mads_console rule='bayes': use one of \['evidence', "
                                         r"'paper'\]"):
        ConsoleConfig(rule='bayes')
    with pytest.raises(ValueError, match=r"reward_transform='clip'"):
        ConsoleConfig(reward_transform='clip')
    with pytest.raises(ValueError, match=r'evidence_decay=0 .*\(0, 1\]'):
        ConsoleConfig(evidence_decay=0)
    with pytest.raises(ValueError, match='memory_strength=-1'):
        ConsoleConfig(memory_strength=-1)


@pytest.fixture(scope='module')
def world(tmp_path_factory):
    return collaboration.build_world(str(tmp_path_factory.mktemp('world') / 'w'), 8_000)


BASE = ConsoleConfig(update_interval=30, probe_size=48, lr_memory=1.0, lr_theta=1.0,
                     repeat_penalty=0.0)


def test_collaboration_goals_on_few_seeds(world):
    """The benchmark's goals ((a) >= 0.97, (b) >= 1.10, (c) <= 0.01), loosened, on 3 seeds of a
    smaller world: MADS within 5% of the best single agent in world a, at least level with it in
    world b (the rule keeps (a) 0.98, (b) 1.08, (c) 0.001 there; 24 seeds of the full world give
    (a) 1.00, (b) 1.13); and the evidence rule beats the paper's."""
    seeds = [0, 1, 2]
    rules = ['mads-paper', 'mads-evidence']
    singles = ['similarity-paper', 'similarity-evidence']  # The best single agents (benchmark).
    results = {}
    for w, arms in (('a', singles + rules), ('b', singles + ['domain-paper', 'domain-evidence']
                                            + rules), ('c', rules)):
        results.update(collaboration.evaluate(world, seeds, 8, 1.5, BASE, arms=arms, worlds=(w,)))
    evidence = collaboration.summary(results, 'evidence')
    paper = collaboration.summary(results, 'paper')
    assert evidence['a'] >= 0.95 and evidence['b'] >= 1.0 and evidence['c'] <= 0.015, evidence
    assert evidence['a'] > paper['a'] and evidence['b'] > paper['b'], (evidence, paper)
    # Drift under pure noise, each run's own (systematic drift, the goal's (c), is small under
    # both rules and, on 3 seeds, mostly chance): the evidence rule's is smaller.
    drift = {rule: results['c'][rule]['kl_run'] for rule in rules}
    assert drift['mads-evidence'] < 0.75 * drift['mads-paper'], drift


def test_benchmark_prints_its_summary_line(capsys):
    collaboration.main(['--quick', '--seeds', '1', '--updates', '1'])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith('collaboration: mads/best-single (a) ')
    assert '(b) ' in last and last.split('uninformative drift (c) ')[1].replace('.', '').isdigit()


def test_paper_rule_stays_selectable_and_bit_identical_to_update_weights():
    from streaming_mads.console.rewards import update_weights
    from streaming_mads.selection.agents import multiplicative_update
    rng = np.random.default_rng(7)
    agents = [_agent('a', [10, 20, 30]), _agent('b', [5, 5])]
    before = [a.memory.copy() for a in agents]
    labels = [rng.integers(0, 3, 30), rng.integers(0, 2, 30)]
    rewards = rng.normal(size=30)
    config = replace(BASE, rule='paper')
    update = apply_rule(agents, np.full(2, 0.5), labels, rewards, config)
    direct = update_weights([a.score_table(m) for a, m in zip(agents, before)], np.full(2, 0.5),
                            labels, rewards, lr_theta=1.0, theta_floor=0.05, value_prior=4.0)
    np.testing.assert_array_equal(update.theta, direct.theta)
    for agent, m, e in zip(agents, before, direct.value_rewards):
        np.testing.assert_array_equal(agent.memory, multiplicative_update(m, e, 1.0, 0.05, 20.0))
