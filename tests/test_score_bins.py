"""Percentiles for score bins (``streaming_mads.score_bins``): rounded ties at their mid-rank."""

import numpy as np
import pytest

from streaming_mads.score_bins import (SIMILARITY_BINS, midrank_percentiles, quantile_table,
                                       round_scores)


def _bins(pct: np.ndarray) -> np.ndarray:
    return np.searchsorted(SIMILARITY_BINS.edges, pct.astype(np.float32), side='right')


def test_rounding_merges_last_bit_noise_only():
    rng = np.random.default_rng(0)
    x = rng.normal(0, 50, 1000)
    noisy = np.nextafter(np.nextafter(x, np.inf), np.inf)  # Two ulps up.
    assert np.array_equal(round_scores(noisy), round_scores(x))
    assert np.array_equal(round_scores(round_scores(x)), round_scores(x))  # Idempotent.
    assert np.all(np.abs(round_scores(x) - x) <= 1e-9 * np.maximum(np.abs(x), 1.0))
    # Differences of a millionth stay apart; noise around 0 is 0.
    assert len(np.unique(round_scores(1.0 + 1e-6 * np.arange(5)))) == 5
    assert np.array_equal(round_scores([1e-17, -1e-17, 0.0]), [0.0, 0.0, 0.0])
    with pytest.raises(ValueError, match='finite'):
        round_scores([0.0, np.nan])


def test_equal_up_to_last_bit_scores_share_the_mid_rank_bin():
    """The issue's case: 600 equally dissimilar samples whose means differ in the last bit. With
    ``np.quantile`` + ``searchsorted`` on the raw means they spread over the bins; rounded and
    mid-ranked, all land in one bin, that of their middle (the 50th percentile)."""
    rng = np.random.default_rng(1)
    base = np.full(600, -0.4054651081081644)
    scores = base + rng.integers(-3, 4, 600) * np.spacing(base)
    assert len(np.unique(scores)) > 1
    raw = np.searchsorted(np.quantile(scores, np.linspace(0, 1, 1001)), scores, side='right') / 1001
    assert len(np.unique(_bins(raw))) > 1  # What the plain table did.
    pct = midrank_percentiles(quantile_table(scores), scores)
    assert np.all(pct == 0.5) and np.all(_bins(pct) == 1)


def test_a_block_across_a_bin_edge_goes_to_the_bin_of_its_middle():
    rng = np.random.default_rng(2)
    low, high = rng.uniform(-5, -1, 400), rng.uniform(1, 5, 300)
    tied = 0.25 + rng.integers(-2, 3, 300) * np.spacing(0.25)  # Ranks 400-699: the 50% edge inside.
    scores = rng.permutation(np.concatenate([low, tied, high]))
    table = quantile_table(scores)
    pct = midrank_percentiles(table, scores)
    block = pct[np.isclose(scores, 0.25)]
    assert len(np.unique(block)) == 1 and 0.5 < block[0] < 0.6  # Mid-rank 549.5 of 999.
    assert len(np.unique(_bins(block))) == 1
    # Distinct scores: about uniform, in score order, 0 at the bottom and 1 at the top.
    order = np.argsort(scores, kind='stable')
    assert np.all(np.diff(pct[order]) >= 0)
    assert pct.min() == 0.0 and pct.max() == 1.0
    assert abs(float(np.mean(pct >= 0.9)) - 0.1) < 0.01
    assert midrank_percentiles(table, [-100.0, 100.0]).tolist() == [0.0, 1.0]


def test_tables_refuse_bad_input():
    with pytest.raises(ValueError, match='at least one score'):
        quantile_table([])
    with pytest.raises(ValueError, match='at least 2 points'):
        quantile_table([1.0], points=1)
    with pytest.raises(ValueError, match='non-decreasing'):
        midrank_percentiles([2.0, 1.0], [1.5])
    with pytest.raises(ValueError, match='finite'):
        midrank_percentiles([0.0, 1.0], [np.inf])
