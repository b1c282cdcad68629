"""The bins of the standard score columns, ``quality`` and ``similarity``, and the percentiles
the similarity bins are read in.

The agents select by these bins and ``mads inspect`` tabulates the labels in them, so both are
defined once, here in the shared base: the table then shows the bins the console steers by, and a
score on another scale (the similarity percentile in ``[0, 1]``) is never tabulated in the 0-5
quality bins.

A percentile is read from a quantile table of a subsample's scores (:func:`quantile_table`,
:func:`midrank_percentiles`). Scores that are equal in meaning but differ in the last bits of a
floating-point sum must not be spread over several bins by that noise, so both sides round the
scores first (:func:`round_scores`), and a block of equal scores gets the percentile of its
*mid-rank*: when a bin edge falls inside the block, the whole block goes to the bin of its middle.
docs/architecture.md ("The labels ``mads label`` computes") has the long form.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

__all__ = ['ScoreBins', 'DEFAULT_QUALITY_EDGES', 'DEFAULT_SIMILARITY_EDGES', 'QUALITY_BINS',
           'SIMILARITY_BINS', 'STANDARD_BINS', 'TIE_BITS', 'QUANTILE_POINTS', 'round_scores',
           'quantile_table', 'midrank_percentiles']

#: Default quality bin edges: five bins over a 0-5 score, as the paper's quality agent.
DEFAULT_QUALITY_EDGES = (1.0, 2.0, 3.0, 4.0)

#: Default similarity bin edges, over the percentile ``mads label --reference`` writes: the
#: bottom half, then the top half, quarter, tenth and twentieth of the training samples.
DEFAULT_SIMILARITY_EDGES = (0.5, 0.75, 0.9, 0.95)


@dataclass(frozen=True)
class ScoreBins:
    """A score's range and its inner bin edges (bins as ``np.searchsorted(edges, x, 'right')``).

    Args:
        low (float): Lowest score.
        high (float): Highest score.
        edges (tuple[float, ...]): Increasing inner edges; ``n`` edges give ``n + 1`` bins.
        percentile (bool): The score is a percentile in ``[0, 1]``, shown as ``%``.
    """
    low: float
    high: float
    edges: tuple[float, ...]
    percentile: bool = False

    def labels(self) -> list[str]:
        """Each bin as an interval: ``[1, 2)``, ``[50%, 75%)`` for a percentile; the last closed."""
        bounds = (self.low, *self.edges, self.high)
        show = (lambda x: f'{100 * x:.3g}%') if self.percentile else (lambda x: f'{x:.3g}')
        return [f'[{show(a)}, {show(b)}{"]" if i == len(bounds) - 2 else ")"}'
                for i, (a, b) in enumerate(zip(bounds, bounds[1:]))]


QUALITY_BINS = ScoreBins(0.0, 5.0, DEFAULT_QUALITY_EDGES)
SIMILARITY_BINS = ScoreBins(0.0, 1.0, DEFAULT_SIMILARITY_EDGES, percentile=True)
#: The bins of each standard score column, by column name.
STANDARD_BINS = {'quality': QUALITY_BINS, 'similarity': SIMILARITY_BINS}


#: Significant bits scores keep before they are ranked (about 9 decimal digits): two scores
#: closer than that are one tie.
TIE_BITS = 30
#: Points of a quantile table: the scores at probabilities ``0, 0.001, ..., 1``.
QUANTILE_POINTS = 1001


def round_scores(scores: ArrayLike) -> NDArray[np.float64]:
    """``scores`` rounded to :data:`TIE_BITS` significant bits, on a fixed grid of ``2**-29`` below 1.

    Relative rounding for large scores (noise of a long sum scales with it); an absolute grid near
    0, where a difference of two equal sums is noise around 0 that relative rounding would keep.
    Rounding to a power-of-two grid is exact, and rounding a rounded score changes nothing.

    Args:
        scores (ArrayLike): Finite scores.

    Returns:
        NDArray[np.float64]: The rounded scores.
    """
    x = np.asarray(scores, np.float64)
    if not np.isfinite(x).all():
        raise ValueError('Scores to rank must be finite: drop or fix the NaN/inf ones.')
    _, exponent = np.frexp(np.maximum(np.abs(x), 1.0))
    step = np.ldexp(1.0, exponent - TIE_BITS)
    return np.round(x / step) * step


def quantile_table(scores: ArrayLike, points: int = QUANTILE_POINTS) -> NDArray[np.float64]:
    """The rounded ``scores``' quantiles at ``points`` evenly spaced probabilities from 0 to 1.

    A fixed-size table, so a percentile is read without the scores (labelling 10^8 samples needs
    the table only). A block of tied scores fills a run of equal entries.

    Args:
        scores (ArrayLike): Finite scores of a (sub)sample, at least one.
        points (int): Table size, at least 2. Defaults to :data:`QUANTILE_POINTS`.

    Returns:
        NDArray[np.float64]: Non-decreasing table of ``points`` scores.
    """
    x = round_scores(scores).reshape(-1)
    if not len(x):
        raise ValueError('A quantile table needs at least one score.')
    if points < 2:
        raise ValueError(f'A quantile table needs at least 2 points, got {points}.')
    return np.quantile(x, np.linspace(0.0, 1.0, points))


def midrank_percentiles(table: ArrayLike, scores: ArrayLike) -> NDArray[np.float64]:
    """Each score's percentile in ``[0, 1]`` among the scores ``table`` was made of.

    A score strictly between two table entries is interpolated between their probabilities
    (the inverse of the table's linear interpolation); one equal to a run of entries (a block of
    ties) gets the middle of the run, its mid-rank; below the table 0, above it 1. Scores are
    rounded as the table's were, so last-bit noise cannot split a block.

    Args:
        table (ArrayLike): A :func:`quantile_table`.
        scores (ArrayLike): Finite scores to place.

    Returns:
        NDArray[np.float64]: Percentiles, one per score.
    """
    q = np.asarray(table, np.float64)
    if q.ndim != 1 or len(q) < 2 or np.any(np.diff(q) < 0):
        raise ValueError('A quantile table is a non-decreasing 1-d array of at least 2 scores: '
                         'make it with quantile_table().')
    x = round_scores(scores)
    last = len(q) - 1
    lo = np.searchsorted(q, x, side='left')
    hi = np.searchsorted(q, x, side='right')
    left = q[np.clip(lo - 1, 0, last)]
    right = q[np.clip(lo, 0, last)]
    gap = np.where(right > left, right - left, 1.0)
    between = (lo - 1 + (x - left) / gap) / last
    tied = (lo + hi - 1) / (2.0 * last)
    return np.where(hi > lo, tied, np.where(lo == 0, 0.0, np.where(lo > last, 1.0, between)))
