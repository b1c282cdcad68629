"""The bins of the standard score columns, ``quality`` and ``similarity``.

The agents select by these bins and ``mads inspect`` tabulates the labels in them, so both are
defined once, here in the shared base: the table then shows the bins the console steers by, and a
score on another scale (the similarity percentile in ``[0, 1]``) is never tabulated in the 0-5
quality bins. docs/architecture.md ("The labels ``mads label`` computes") has the long form.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ['ScoreBins', 'DEFAULT_QUALITY_EDGES', 'DEFAULT_SIMILARITY_EDGES', 'QUALITY_BINS',
           'SIMILARITY_BINS', 'STANDARD_BINS']

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
