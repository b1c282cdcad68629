"""Reference similarity for ``mads label --reference``: a hashed-word importance score.

Domains and topics are properties of the corpus. A reference task can be a *theme* that none of
them carries: on the packages corpus (docs/results.md) the reference is the numerical-computing
packages, a small share of every domain and of every k-means topic, and the three paper agents
could only trade whole domains against each other. This module gives the console a label that
does carry such a theme, in the manner of data selection by importance resampling (DSIR, Xie et
al. 2023): each sample is scored by how much likelier its words are under the reference than
under the training corpus, and the score is stored as the sample's *percentile* among the
training samples, so one set of bins (:data:`streaming_mads.score_bins.SIMILARITY_BINS`: top half,
quarter, tenth and twentieth, used by the ``similarity`` agent and ``mads inspect``) means the
same on every corpus.

The model, all in numpy:

* words are :func:`streaming_mads.labeling.topics.term_rows`' hashed words, folded into ``2**16``
  buckets (enough for a reference of a few thousand documents; fewer buckets than words only
  merges rare words);
* the corpus distribution ``p_raw`` is the bucket frequencies of a seeded subsample of the
  training samples, add-one smoothed;
* the reference distribution ``p_ref`` is the reference's bucket counts smoothed *towards*
  ``p_raw`` with ``prior_words`` pseudo-words (a Dirichlet prior): a word the reference never
  uses gets a ratio below one but not zero, and a small reference cannot make a rare word
  infinitely important;
* a sample's score is the mean over its words of ``log p_ref - log p_raw``; a sample with no
  words scores as a word the reference never uses.

The percentile is read from a table of the subsample's score quantiles (1,001 points), so
scoring a sample needs the model only, never the whole corpus: labelling 10^8 samples costs one
pass, in parallel shards, like the topic pass. See docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any, Optional, Sequence

import numpy as np
from numpy.typing import NDArray

from streaming_mads.labeling.topics import TermRows, term_rows

__all__ = ['SimilarityError', 'SimilarityModel', 'SIMILARITY_BUCKETS', 'DEFAULT_PRIOR_WORDS',
           'bucket_counts', 'fit_similarity']

#: Hashed-word buckets of the similarity model.
SIMILARITY_BUCKETS = 1 << 16
#: Pseudo-words of the prior that smooths the reference distribution towards the corpus'.
DEFAULT_PRIOR_WORDS = 1e5
#: Points of the score-quantile table that turns scores into percentiles.
QUANTILE_POINTS = 1001
SIMILARITY_FORMAT = 'mads-similarity'


class SimilarityError(ValueError):
    """The similarity model cannot be fitted or loaded; the message says what to change."""


def bucket_counts(rows: TermRows, buckets: int = SIMILARITY_BUCKETS) -> NDArray[np.float64]:
    """Total word count per folded bucket over all rows of ``rows``."""
    return np.bincount(rows.buckets % buckets, weights=rows.counts, minlength=buckets)


def _row_scores(rows: TermRows, log_ratio: NDArray[np.float64], empty: float) -> NDArray[np.float64]:
    """Mean ``log_ratio`` over each row's words (``empty`` for a row with none)."""
    n = len(rows)
    row_of = np.repeat(np.arange(n), np.diff(rows.indptr))
    weights = rows.counts.astype(np.float64)
    total = np.bincount(row_of, weights=weights * log_ratio[rows.buckets % len(log_ratio)],
                        minlength=n)
    words = np.bincount(row_of, weights=weights, minlength=n)
    return np.where(words > 0, total / np.maximum(words, 1.0), empty)


class SimilarityModel:
    """A fitted reference-similarity scorer: per-bucket log ratios and the corpus' score quantiles.

    Args:
        log_ratio (NDArray): ``log p_ref - log p_raw`` per bucket.
        quantiles (NDArray): Increasing scores of the training subsample at ``QUANTILE_POINTS``
            evenly spaced quantiles (from 0 to 1).
        info (dict, optional): Description saved beside it (fit sizes, prior).
    """

    def __init__(self, log_ratio: NDArray, quantiles: NDArray,
                 info: Optional[dict[str, Any]] = None) -> None:
        self.log_ratio = np.asarray(log_ratio, np.float64)
        self.quantiles = np.asarray(quantiles, np.float64)
        self.info = dict(info or {})

    @property
    def empty_score(self) -> float:
        """Score of a text with no words: that of a word the reference never uses."""
        return float(self.log_ratio.min())

    def scores(self, texts: Sequence[str]) -> NDArray[np.float64]:
        """Mean log-likelihood ratio (reference / corpus) of each text's words."""
        return _row_scores(term_rows(texts), self.log_ratio, self.empty_score)

    def percentiles(self, scores: NDArray) -> NDArray[np.float32]:
        """Share of the training subsample scoring at most each score, in ``[0, 1]``."""
        rank = np.searchsorted(self.quantiles, np.asarray(scores, np.float64), side='right')
        return (rank / len(self.quantiles)).astype(np.float32)

    def __call__(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """The ``similarity`` label of each text: its score's percentile among the corpus'."""
        return self.percentiles(self.scores(texts))

    def save(self, directory: str) -> None:
        """Write ``log_ratio.npy``, ``quantiles.npy`` and ``similarity.json``."""
        os.makedirs(directory, exist_ok=True)
        np.save(os.path.join(directory, 'log_ratio.npy'), self.log_ratio, allow_pickle=False)
        np.save(os.path.join(directory, 'quantiles.npy'), self.quantiles, allow_pickle=False)
        with open(os.path.join(directory, 'similarity.json'), 'w', encoding='utf-8') as f:
            json.dump({'format': SIMILARITY_FORMAT, 'version': 1, **self.info}, f, indent=1,
                      sort_keys=True)
            f.write('\n')

    @classmethod
    def load(cls, directory: str) -> 'SimilarityModel':
        """Load a model written by :meth:`save`."""
        path = os.path.join(directory, 'similarity.json')
        if not os.path.isfile(path):
            raise SimilarityError(f'No similarity model at {directory} (similarity.json missing).')
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
        if meta.get('format') != SIMILARITY_FORMAT:
            raise SimilarityError(f'{path} is not a MADS similarity model.')
        info = {k: v for k, v in meta.items() if k not in ('format', 'version')}
        return cls(np.load(os.path.join(directory, 'log_ratio.npy'), allow_pickle=False),
                   np.load(os.path.join(directory, 'quantiles.npy'), allow_pickle=False), info)

    def fingerprint(self) -> str:
        """Hash of what decides the labels (for resuming only with the same model)."""
        h = hashlib.sha256(self.log_ratio.tobytes())
        h.update(self.quantiles.tobytes())
        return h.hexdigest()[:16]


def fit_similarity(reference: TermRows, corpus: TermRows,
                   prior_words: float = DEFAULT_PRIOR_WORDS,
                   buckets: int = SIMILARITY_BUCKETS) -> SimilarityModel:
    """Fit the model on the reference's words and a subsample of the training samples' words.

    Args:
        reference (TermRows): Hashed words of the reference texts.
        corpus (TermRows): Hashed words of a (seeded) subsample of training samples, one row per
            sample; its rows' scores give the percentile table.
        prior_words (float): Pseudo-words pulling the reference distribution towards the corpus'.
            Defaults to ``1e5``.
        buckets (int): Folded bucket count. Defaults to ``2**16``.
    """
    if prior_words <= 0:
        raise SimilarityError(f'prior_words must be positive, got {prior_words}.')
    ref = bucket_counts(reference, buckets)
    raw = bucket_counts(corpus, buckets)
    if ref.sum() <= 0:
        raise SimilarityError('The reference has no words to compare with: give a reference set of '
                              'text (or tokens with the tokenizer they were made with).')
    if len(corpus) == 0 or raw.sum() <= 0:
        raise SimilarityError('The training subsample has no words: check --text-column / the '
                              'tokenizer of the training data.')
    p_raw = (raw + 1.0) / (raw.sum() + buckets)
    p_ref = (ref + prior_words * p_raw) / (ref.sum() + prior_words)
    log_ratio = np.log(p_ref) - np.log(p_raw)
    scores = _row_scores(corpus, log_ratio, float(log_ratio.min()))
    quantiles = np.quantile(scores, np.linspace(0.0, 1.0, QUANTILE_POINTS))
    return SimilarityModel(log_ratio, quantiles, {
        'buckets': buckets, 'prior_words': prior_words, 'reference_words': float(ref.sum()),
        'corpus_samples': len(corpus), 'corpus_words': float(raw.sum())})
