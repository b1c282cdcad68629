"""Selection math, agents' memory updates and the weight board, as plain functions."""

from __future__ import annotations

import os

import numpy as np
import pytest

from streaming_mads.selection.agents import BinnedAgent, CategoricalAgent, build_agent, multiplicative_update
from streaming_mads.selection.board import VersionEvictedError, VersionTimeoutError, WeightBoard
from streaming_mads.selection.scores import (centred_log_weights, combined_scores, gumbel_noise,
                                      gumbel_topk, score_tables)


def test_centred_scores_are_centred_over_the_label_mix_and_keep_the_contrast():
    w, f = np.array([1.0, 2.0, 8.0]), np.array([10, 30, 60])
    s = centred_log_weights(w, f)
    p = f / f.sum()
    assert abs(np.dot(p, s)) < 1e-12
    np.testing.assert_allclose(np.diff(s), np.diff(np.log(w)))  # Not rescaled by the spread.
    assert np.all(centred_log_weights(np.full(4, 3.0), np.ones(4)) == 0)


def _keep_shares(memory: np.ndarray, tau: float, pools: int = 3000) -> np.ndarray:
    """Share of kept candidates per value when pools of 8 (two of each value) keep 2."""
    labels = np.repeat(np.arange(4), 2)
    table = centred_log_weights(memory, np.ones(4))
    kept = np.zeros(4)
    for k in range(pools):
        keep = gumbel_topk(table[labels], gumbel_noise((5, k), 8), 2, tau)
        np.add.at(kept, labels[keep], 1)
    return kept / kept.sum()


def test_selection_strength_follows_the_memory_contrast():
    # Near-equal memories select near uniformly (a standardised score would select hard).
    near = _keep_shares(np.array([1.0, 1.0, 1.0, 1.0 + 1e-9]), tau=0.25)
    assert np.all(np.abs(near - 0.25) < 0.03)
    # Strength grows monotonically with the contrast of the memory.
    shares = [_keep_shares(np.array([1.0, 1.0, 1.0, c]), tau=0.5)[3] for c in (1.0, 1.5, 3, 10, 50)]
    assert np.all(np.diff(shares) > 0) and shares[0] < 0.3 and shares[-1] > 0.45
    # Temperature sharpens the same memory.
    mem = np.array([1.0, 1.0, 1.0, 3.0])
    assert _keep_shares(mem, 2.0)[3] < _keep_shares(mem, 1.0)[3] < _keep_shares(mem, 0.25)[3]


def test_score_tables_and_combination():
    tables = score_tables([np.array([0.5, -0.5]), np.array([1.0, 0.0, -1.0])], np.array([0.25, 0.75]))
    np.testing.assert_allclose(tables[0], [0.125, -0.125])
    ids = [np.array([0, 1, 1]), np.array([0, 0, 2])]
    expected = [tables[0][a] + tables[1][b] for a, b in zip(*ids)]
    np.testing.assert_allclose(combined_scores(tables, ids), expected)


def test_gumbel_noise_is_deterministic_and_gumbel_distributed():
    a, b = gumbel_noise((1, 2, 3), 200_000), gumbel_noise((1, 2, 3), 200_000)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[:100], gumbel_noise((1, 2, 4), 100))
    assert abs(a.mean() - np.euler_gamma) < 0.01
    assert abs(a.var() - np.pi**2 / 6) < 0.03
    np.testing.assert_array_equal(gumbel_noise((9,), 10), gumbel_noise((9,), 20)[:10])


def test_hard_topk_ties_and_padding():
    scores = np.array([0.0, 5.0, -np.inf, 5.0, 1.0, -np.inf])
    noise = gumbel_noise((0,), 6)
    assert gumbel_topk(scores, noise, 3, 0.0).tolist() == [1, 3, 4]
    assert gumbel_topk(scores, noise, 10, 0.5).tolist() == [0, 1, 3, 4]  # Never padding.
    assert gumbel_topk(scores, noise, 3, 1e-9).tolist() == [1, 3, 4]
    # Equal scores: hard top-k picks uniformly (by the noise), not the first positions.
    picks = np.zeros(8)
    for k in range(2000):
        picks[gumbel_topk(np.zeros(8), gumbel_noise((k,), 8), 2, 0.0)] += 1
    assert picks.min() > 400 and picks.max() < 600


def test_multiplicative_update_floors_caps_and_unmeasured_values():
    w = multiplicative_update(np.ones(4), np.array([3.0, -3.0, np.nan, 0.0]), lr=1.0, floor=0.1,
                              cap=3.0)
    assert abs(w.mean() - 1) < 1e-9 and w.min() >= 0.1 - 1e-9 and w.max() <= 3.0 + 1e-9
    assert w[0] > w[3] > w[1] and w[2] == pytest.approx(w[3])
    huge = multiplicative_update(np.ones(3), np.array([1e6, -1e6, 0]), 1.0, 0.05, 20.0)
    assert np.all(np.isfinite(huge)) and huge.min() >= 0.05 - 1e-9


def test_agent_specs():
    assert isinstance(build_agent('domain'), CategoricalAgent)
    q = build_agent({'type': 'quality', 'bins': [2.5]})
    assert isinstance(q, BinnedAgent) and q.name == 'quality' and q.edges.tolist() == [2.5]
    ppl = build_agent({'name': 'ppl', 'column': 'ppl_score', 'bins': [10, 20]})
    assert ppl.label_ids(np.array([5.0, 10.0, 15.0, 99.0])).tolist() == [0, 1, 1, 2]
    sim = build_agent('similarity')
    assert sim.column == 'similarity' and sim.edges.tolist() == [0.5, 0.75, 0.9, 0.95]
    assert sim.label_ids(np.array([0.1, 0.5, 0.8, 0.93, 1.0])).tolist() == [0, 1, 2, 3, 4]
    sim2 = build_agent({'type': 'similarity', 'init': [1, 1, 2]})
    assert sim2.edges.tolist() == [0.5, 0.75, 0.9, 0.95] and sim2.init.tolist() == [1, 1, 2]
    with pytest.raises(ValueError, match='increasing'):
        build_agent({'name': 'x', 'bins': [3, 1]})
    with pytest.raises(ValueError, match='unknown keys'):
        build_agent({'name': 'x', 'colum': 'y'})


def _board(capacity: int = 4) -> WeightBoard:
    return WeightBoard(f'mads_test_{os.getpid()}_{capacity}', [2, 3], capacity, create=True)


def test_board_versions_and_schedule():
    board = _board()
    try:
        assert board.latest == -1 and board.read(0) is None and board.version_for_batch(99) == 0
        board.publish(0, [0.5, 0.5], [np.ones(2), np.ones(3)])
        board.configure(update_interval=10, lead=3)
        assert board.version_for_batch(9) == 0 and board.version_for_batch(10) == 1
        for v in range(1, 7):
            board.publish(v, [v, 1.0], [np.full(2, v), np.arange(3.0) * v])
        got = board.read(6)
        assert got.version == 6 and got.theta.tolist() == [6, 1] and got.memories[1].tolist() == [0, 6, 12]
        with pytest.raises(VersionEvictedError, match='board_capacity'):
            board.read(1)
        assert board.read(7) is None
        with pytest.raises(VersionTimeoutError, match='lead 3'):
            board.wait_for(7, timeout=0.05, batch=70)
        with pytest.raises(ValueError, match='do not fit'):
            board.publish(7, [1.0], [np.ones(2), np.ones(3)])
    finally:
        board.cleanup()


def test_board_is_shared_across_processes():
    import multiprocessing as mp
    board = _board(8)
    try:
        board.publish(0, [0.25, 0.75], [np.array([1.0, 2.0]), np.array([3.0, 4.0, 5.0])])
        with mp.get_context('spawn').Pool(1) as pool:
            theta, mem = pool.apply(_read_in_child, (board,))
        assert theta == [0.25, 0.75] and mem == [3.0, 4.0, 5.0]
    finally:
        board.cleanup()


def _read_in_child(board: WeightBoard):
    w = board.read(0)
    return w.theta.tolist(), w.memories[1].tolist()


def test_agent_initial_memory(mds_dir):
    from streaming_mads import MADSDataset
    ds = MADSDataset(local=mds_dir, batch_size=4, agents=[
        {'type': 'quality', 'init': [1, 2, 3, 4, 5]}, {'name': 'domain', 'init': [4, 3, 2, 1]}])
    assert ds.agents[0].memory.tolist() == [1, 2, 3, 4, 5]
    assert ds.weights(0).memories[1].tolist() == [4, 3, 2, 1]  # Version 0 starts from it.
    del ds
    with pytest.raises(ValueError, match='`init` has 2 weights for 4 label values'):
        MADSDataset(local=mds_dir, batch_size=4, agents=[{'name': 'domain', 'init': [1, 2]}])
    with pytest.raises(ValueError, match='positive'):
        build_agent({'name': 'domain', 'init': [1, 0]})


def test_agent_score_and_update(mds_dir):
    from streaming_mads import MADSDataset
    ds = MADSDataset(local=mds_dir, batch_size=4, agents=['domain'])
    agent = ds.agents[0]
    assert np.all(agent.score(np.array([0, 1, 2, 3])) == 0)  # Uniform memory: no opinion.
    memory = agent.update(np.array([2.0, -1.0, 0.0, 0.5]), lr=1.0, floor=0.05, cap=20.0)
    assert memory is agent.memory
    s = agent.score(np.array([0, 1, 2, 3]))
    assert s[0] > s[3] > s[2] > s[1]
    np.testing.assert_allclose(np.diff(s), np.diff(np.log(memory)))
    freq = agent.freq / agent.freq.sum()
    assert abs(np.dot(freq, s)) < 1e-12
    del ds


class _Inverted(CategoricalAgent):
    """A user's agent: prefers what the memory dislikes (its own score rule)."""

    def score_table(self, memory=None):
        return -super().score_table(memory)


def test_dataset_selects_with_the_agents_own_score_table(mds_dir):
    from streaming_mads import MADSDataset
    ds = MADSDataset(local=mds_dir, batch_size=4, agents=[_Inverted('domain', 'domain')])
    ds.publish(1, np.array([1.0]), [np.array([1.0, 1.0, 1.0, 50.0])])
    assert ds.score_tables(ds.weights(1))[0].argmin() == 3  # The subclass' rule, not the default.
    del ds


@pytest.mark.parametrize('tau', [0.0, 0.5, 2.0])
def test_simulated_keep_matches_the_loaders_selection(tau):
    from streaming_mads.selection.scores import repeat_penalized, simulate_keep
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 4, 64 * 400)
    table = np.array([2.0, 0.5, 0.0, -1.0])
    kept = np.zeros(4)
    for k in range(400):  # Pools of 64 keeping 16, as the dataset does.
        lab = labels[64 * k:64 * (k + 1)]
        np.add.at(kept, lab[gumbel_topk(table[lab], gumbel_noise((3, k), 64), 16, tau)], 1)
    # From a uniform subset of 2048 of those candidates, as the console sees them.
    sub = labels[rng.choice(len(labels), 2048, replace=False)]
    sim = simulate_keep(table[sub], 64, 16, tau, (1, 2))
    assert sim.sum() == 256 * 16
    np.testing.assert_array_equal(sim, simulate_keep(table[sub], 64, 16, tau, (1, 2)))
    predicted = np.bincount(sub, weights=sim, minlength=4) / sim.sum()
    np.testing.assert_allclose(predicted, kept / kept.sum(), atol=0.03)
    np.testing.assert_allclose(repeat_penalized(np.array([2.0, 1.0]), np.array([10.0, 0.0]), 0.1),
                               [1.0, 1.0])
