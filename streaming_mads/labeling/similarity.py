"""Reference similarity for ``mads label --reference``: a hashed n-gram importance score.

Domains and topics are properties of the corpus. A reference task can be a *theme* that none of
them carries: on the packages corpus (docs/results.md) the reference is the numerical-computing
packages, a small share of every domain and of every k-means topic, and the three paper agents
could only trade whole domains against each other. This module gives the console a label that
does carry such a theme, in the manner of data selection by importance resampling (DSIR, Xie et
al. 2023): each sample is scored by how much likelier its features are under the reference than
under the training corpus, and the score is stored as the sample's *percentile* among the
training samples, so one set of bins (:data:`streaming_mads.score_bins.SIMILARITY_BINS`: top half,
quarter, tenth and twentieth, used by the ``similarity`` agent and ``mads inspect``) means the
same on every corpus.

The model (version 2), all in numpy:

* features, as DSIR's: a text's lower-cased words (runs of letters and digits) and its adjacent
  word pairs, hashed into ``2**18`` shared buckets (CRC-32 of each word, then a fixed
  multiplicative hash of one word's or two words' CRCs: the same on every process and machine,
  unlike Python's salted ``hash``). The pairs see word order, so a word-shuffled text no longer
  scores as its original;
* the corpus distribution ``p_raw`` is the bucket frequencies of a seeded subsample of the
  training samples, add-one smoothed; the reference's, ``p_ref``, is its bucket counts smoothed
  *towards* ``p_raw`` with ``prior_words`` pseudo-features (a Dirichlet prior), so a feature the
  reference never uses gets a ratio below one but not zero;
* the score is length-aware. Each feature carries ``r = log p_ref - log p_raw`` minus ``r``'s
  mean over the corpus' features; DSIR sums that over the text, which ranks long texts first,
  and a plain mean is noise for a short text (three words that happen to be in the reference
  put it in the top bin however little the reference says). The score is therefore the mean
  ``m`` over a text's ``n`` features in units of the spread of such means among corpus texts of
  that length, ``m / sqrt(a / n + b)``: ``a`` is the variance of ``r`` over the corpus' features
  (the sampling noise of a mean of ``n`` of them) and ``b`` the spread of the texts' true means
  (by moments, on the subsample). A short text, mostly noise, is pulled towards 0 (the corpus
  average, which is also the score of a text with no words); a long one is ranked by its mean;
  and when the reference says nothing about the corpus, texts of every length spread alike, so
  short ones take their share of the top bins, not all of them.

The percentile is read from a 1,001-point table of the subsample's score quantiles, with ties
(scores equal to about 9 digits) at their mid-rank (:func:`streaming_mads.score_bins.
midrank_percentiles`), so scoring a sample needs the model only: labelling 10^8 samples costs one
pass, in parallel shards, like the topic pass. Version 1 (mean of hashed-word unigram log-ratios)
still loads, to be recognised and relabelled. See docs/architecture.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import zlib
from dataclasses import dataclass
from itertools import chain
from typing import Any, Optional, Sequence

import numpy as np
from numpy.typing import NDArray

from streaming_mads.score_bins import midrank_percentiles, quantile_table, round_scores

__all__ = ['SimilarityError', 'SimilarityModel', 'FeatureRows', 'SIMILARITY_BUCKETS',
           'SIMILARITY_VERSION', 'SIMILARITY_FEATURES', 'DEFAULT_PRIOR_WORDS',
           'similarity_features', 'fit_similarity', 'saved_model_note']

#: Hashed-feature buckets of the similarity model (words and word pairs share them).
SIMILARITY_BUCKETS = 1 << 18
#: Pseudo-features of the prior that smooths the reference distribution towards the corpus'.
DEFAULT_PRIOR_WORDS = 1e5
#: Version of the model saved by :meth:`SimilarityModel.save`; 1 was the word-unigram mean.
SIMILARITY_VERSION = 2
#: What each version scores, as saved and shown by ``mads inspect``.
SIMILARITY_FEATURES = {1: 'mean log-ratio of hashed word unigrams',
                       2: 'length-standardised log-ratio of hashed word unigrams + bigrams'}
SIMILARITY_FORMAT = 'mads-similarity'
RELABEL = '`mads label DATASET --reference REF --columns similarity`'

_WORD_RE = re.compile(r'[^\W_]+')
_WORD_MUL = np.uint64(0x9E3779B97F4A7C15)  # Odd 64-bit multipliers (Fibonacci hashing).
_PAIR_MUL = np.uint64(0xC2B2AE3D27D4EB4F)


class SimilarityError(ValueError):
    """The similarity model cannot be fitted or loaded; the message says what to change."""


@dataclass
class FeatureRows:
    """Hashed features of several texts (CSR): row ``i`` is ``buckets[indptr[i]:indptr[i+1]]``.

    Args:
        indptr (NDArray[np.int64]): Row offsets, ``len(rows) + 1`` of them.
        buckets (NDArray[np.int32]): Each feature's bucket, in ``[0, num_buckets)``.
        num_buckets (int): Buckets the features were hashed into. Defaults to
            :data:`SIMILARITY_BUCKETS`.
    """
    indptr: NDArray[np.int64]
    buckets: NDArray[np.int32]
    num_buckets: int = SIMILARITY_BUCKETS

    def __len__(self) -> int:
        return len(self.indptr) - 1

    def lengths(self) -> NDArray[np.int64]:
        """Features per row."""
        return np.diff(self.indptr)

    @classmethod
    def concat(cls, parts: Sequence['FeatureRows'],
               num_buckets: int = SIMILARITY_BUCKETS) -> 'FeatureRows':
        """The rows of ``parts`` (e.g. of several shards) as one, in order."""
        if any(p.num_buckets != num_buckets for p in parts):
            raise SimilarityError('Feature rows hashed into different bucket counts cannot be '
                                  'joined: extract them all with the same num_buckets.')
        offsets = np.cumsum([0] + [int(p.indptr[-1]) for p in parts])
        indptr = np.concatenate([np.zeros(1, np.int64)] +
                                [np.asarray(p.indptr[1:], np.int64) + o for p, o in zip(parts, offsets)])
        buckets = (np.concatenate([p.buckets for p in parts]) if parts else np.zeros(0, np.int32))
        return cls(indptr, buckets.astype(np.int32, copy=False), num_buckets)


def _check_buckets(num_buckets: int) -> int:
    bits = int(num_buckets).bit_length() - 1
    if num_buckets != 1 << bits or not 8 <= bits <= 30:
        raise SimilarityError(f'num_buckets must be a power of two from 2**8 to 2**30, got '
                              f'{num_buckets}.')
    return bits


def similarity_features(texts: Sequence[str],
                        num_buckets: int = SIMILARITY_BUCKETS) -> FeatureRows:
    """Each text's hashed words and adjacent word pairs (a text of ``n`` words has ``2n - 1``).

    Python touches each word once (the regex and a dict of the batch's distinct words); the
    hashing and the layout are numpy.

    Args:
        texts (Sequence[str]): The texts.
        num_buckets (int): Buckets to hash into, a power of two. Defaults to
            :data:`SIMILARITY_BUCKETS`.

    Returns:
        FeatureRows: One row per text, its words' buckets, then its pairs'.
    """
    shift = np.uint64(64 - _check_buckets(num_buckets))
    words = [_WORD_RE.findall(t.lower()) for t in texts]
    n = np.fromiter(map(len, words), np.int64, len(words))
    vocab: dict[str, int] = {}
    codes = np.fromiter((vocab.setdefault(w, len(vocab)) for w in chain.from_iterable(words)),
                        np.int64, int(n.sum()))
    crc = np.fromiter((zlib.crc32(w.encode('utf-8')) for w in vocab), np.uint64, len(vocab))
    h = crc[codes]
    features = np.where(n > 0, 2 * n - 1, 0)
    indptr = np.concatenate([np.zeros(1, np.int64), np.cumsum(features)])
    out = np.empty(int(indptr[-1]), np.int32)
    row = np.repeat(np.arange(len(n)), n)
    k = np.arange(len(h)) - (np.cumsum(n) - n)[row]  # Word's place in its text.
    out[indptr[row] + k] = ((h * _WORD_MUL) >> shift).astype(np.int32)
    i = np.flatnonzero(k < n[row] - 1)  # Words followed by another of the same text.
    pairs = (h[i] << np.uint64(32)) | h[i + 1]
    out[indptr[row[i]] + n[row[i]] + k[i]] = ((pairs * _PAIR_MUL) >> shift).astype(np.int32)
    return FeatureRows(indptr, out, num_buckets)


def _centred(log_ratio: NDArray[np.float64], center: float) -> NDArray[np.float64]:
    """``log_ratio - center``, with differences at rounding-noise level set to exactly 0 (a
    reference that says nothing about a feature must not rank texts by float noise)."""
    c = log_ratio - center
    c[np.abs(c) <= 1e-12 * (1.0 + np.abs(log_ratio).max(initial=0.0))] = 0.0
    return c


def _row_sums(rows: FeatureRows, weights: NDArray[np.float64]) -> tuple[NDArray, NDArray]:
    """Sum of ``weights`` over each row's features, and the row's feature count."""
    n = rows.lengths()
    row_of = np.repeat(np.arange(len(n)), n)
    return np.bincount(row_of, weights=weights[rows.buckets], minlength=len(n)), n


def _standardised(sums: NDArray, n: NDArray, noise: float, spread: float) -> NDArray[np.float64]:
    """``m / sqrt(noise / n + spread)`` with ``m = sums / n``, written as ``sums / sqrt(noise n +
    spread n^2)``; 0 for a row with no features (or a model without variance), rounded."""
    var = noise * n + spread * n.astype(np.float64) ** 2
    z = np.where(var > 0, sums / np.sqrt(np.where(var > 0, var, 1.0)), 0.0)
    return round_scores(z)


class SimilarityModel:
    """A fitted reference-similarity scorer: per-bucket log ratios, the statistics that make the
    score length-aware, and the corpus' score quantiles.

    Args:
        log_ratio (NDArray): ``log p_ref - log p_raw`` per bucket.
        quantiles (NDArray): Non-decreasing scores of the training subsample at evenly spaced
            quantiles from 0 to 1 (:func:`streaming_mads.score_bins.quantile_table`).
        center (float): Mean of ``log_ratio`` over the corpus' features. Defaults to ``0.0``.
        noise (float): Variance of ``log_ratio`` over the corpus' features (``a``). Defaults to
            ``1.0``.
        spread (float): Variance of the corpus texts' true mean log-ratios (``b``). Defaults to
            ``0.0``.
        info (dict, optional): Description saved beside it (fit sizes, prior).
        version (int): Model version; only :data:`SIMILARITY_VERSION` scores texts (version 1
            loads, to be recognised). Defaults to :data:`SIMILARITY_VERSION`.
    """

    def __init__(self, log_ratio: NDArray, quantiles: NDArray, center: float = 0.0,
                 noise: float = 1.0, spread: float = 0.0, info: Optional[dict[str, Any]] = None,
                 version: int = SIMILARITY_VERSION) -> None:
        self.log_ratio = np.asarray(log_ratio, np.float64)
        self.quantiles = np.asarray(quantiles, np.float64)
        self.center, self.noise, self.spread = float(center), float(noise), float(spread)
        self.info = dict(info or {})
        self.version = int(version)
        self.weights = _centred(self.log_ratio, self.center)

    @property
    def num_buckets(self) -> int:
        """Buckets the model's features are hashed into."""
        return len(self.log_ratio)

    def require_current(self) -> None:
        """Raise :class:`SimilarityError`, naming the relabel command, unless this model is the
        version this release scores with."""
        if self.version != SIMILARITY_VERSION:
            raise SimilarityError(
                f'This similarity model is version {self.version} '
                f'({SIMILARITY_FEATURES.get(self.version, "unknown")}); this release scores with '
                f'version {SIMILARITY_VERSION} ({SIMILARITY_FEATURES[SIMILARITY_VERSION]}): '
                f'relabel with {RELABEL}.')

    def feature_scores(self, rows: FeatureRows) -> NDArray[np.float64]:
        """Length-standardised mean log-likelihood ratio of each row (see the module doc)."""
        self.require_current()
        if rows.num_buckets != self.num_buckets:
            raise SimilarityError(f'Features hashed into {rows.num_buckets} buckets, but the model '
                                  f'has {self.num_buckets}: extract them with num_buckets='
                                  f'{self.num_buckets}.')
        return _standardised(*_row_sums(rows, self.weights), self.noise, self.spread)

    def scores(self, texts: Sequence[str]) -> NDArray[np.float64]:
        """Length-standardised mean log-likelihood ratio (reference / corpus) of each text."""
        self.require_current()
        return self.feature_scores(similarity_features(texts, self.num_buckets))

    def percentiles(self, scores: NDArray) -> NDArray[np.float32]:
        """Each score's mid-rank share of the training subsample, in ``[0, 1]``."""
        return midrank_percentiles(self.quantiles, scores).astype(np.float32)

    def __call__(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """The ``similarity`` label of each text: its score's percentile among the corpus'."""
        return self.percentiles(self.scores(texts))

    def save(self, directory: str) -> None:
        """Write ``log_ratio.npy``, ``quantiles.npy`` and ``similarity.json`` (version, features,
        the score's statistics and the fit's description)."""
        os.makedirs(directory, exist_ok=True)
        np.save(os.path.join(directory, 'log_ratio.npy'), self.log_ratio, allow_pickle=False)
        np.save(os.path.join(directory, 'quantiles.npy'), self.quantiles, allow_pickle=False)
        with open(os.path.join(directory, 'similarity.json'), 'w', encoding='utf-8') as f:
            json.dump({**self.info, 'format': SIMILARITY_FORMAT, 'version': self.version,
                       'features': SIMILARITY_FEATURES.get(self.version, 'unknown'),
                       'center': self.center, 'noise': self.noise, 'spread': self.spread},
                      f, indent=1, sort_keys=True)
            f.write('\n')

    @classmethod
    def load(cls, directory: str) -> 'SimilarityModel':
        """Load a model written by :meth:`save` (version 1 too: it loads, but does not score)."""
        meta = _read_meta(directory)
        stats = {k: meta[k] for k in ('center', 'noise', 'spread') if k in meta}
        info = {k: v for k, v in meta.items()
                if k not in ('format', 'version', 'features', 'center', 'noise', 'spread')}
        return cls(np.load(os.path.join(directory, 'log_ratio.npy'), allow_pickle=False),
                   np.load(os.path.join(directory, 'quantiles.npy'), allow_pickle=False),
                   **stats, info=info, version=meta['version'])

    def fingerprint(self) -> str:
        """Hash of what decides the labels (for resuming only with the same model)."""
        h = hashlib.sha256(repr((self.version, self.center, self.noise, self.spread)).encode())
        h.update(self.log_ratio.tobytes())
        h.update(self.quantiles.tobytes())
        return h.hexdigest()[:16]


def _read_meta(directory: str) -> dict[str, Any]:
    """The ``similarity.json`` of a saved model, checked for format and a known version."""
    path = os.path.join(directory, 'similarity.json')
    if not os.path.isfile(path):
        raise SimilarityError(f'No similarity model at {directory} (similarity.json missing).')
    with open(path, encoding='utf-8') as f:
        meta = json.load(f)
    if not isinstance(meta, dict) or meta.get('format') != SIMILARITY_FORMAT:
        raise SimilarityError(f'{path} is not a MADS similarity model.')
    if meta.get('version') not in SIMILARITY_FEATURES:
        raise SimilarityError(f'{path} is similarity model version {meta.get("version")!r}, which '
                              f'this release does not know (it reads {sorted(SIMILARITY_FEATURES)})'
                              f': upgrade streaming-mads, or relabel with {RELABEL}.')
    return meta


def _length_variance(means: NDArray, n: NDArray, noise: float) -> tuple[float, float]:
    """``(a, b)`` of ``E[m^2] = a / n + b`` over the subsample's texts (mean ``m`` of ``n`` features).

    Weighted least squares (weights ``1 / (a / n + b)^2``, the variance of ``m^2`` when ``m`` is
    about normal, so neither the many noisy short texts nor the few long ones decide alone), a
    few reweighting rounds from the per-feature variance ``noise``. Fitting ``a`` rather than
    taking ``noise`` absorbs the correlation of a text's words and pairs; both stay ``>= 0``.
    """
    x, y = 1.0 / n, means ** 2
    a, b = noise, max(0.0, float(np.mean(y) - noise * np.mean(x))) if len(y) else 0.0
    if len(y) < 2 or np.ptp(x) == 0:  # One length: a and b cannot be told apart.
        return a, b
    for _ in range(5):
        var = a * x + b
        if not np.all(var > 0):
            break
        w = 1.0 / var ** 2
        sw, sx, sy = w.sum(), w @ x, w @ y
        sxx, sxy = w @ (x * x), w @ (x * y)
        det = sw * sxx - sx * sx
        a, b = (sw * sxy - sx * sy) / det, (sxx * sy - sx * sxy) / det
        if b < 0:
            a, b = sxy / sxx, 0.0
        if a < 0:
            a, b = 0.0, sy / sw
        a, b = float(a), float(b)
    return (a, b) if a + b > 0 else (noise, 0.0)


def fit_similarity(reference: FeatureRows, corpus: FeatureRows,
                   prior_words: float = DEFAULT_PRIOR_WORDS) -> SimilarityModel:
    """Fit the model on the reference's features and a subsample of the training samples'.

    Args:
        reference (FeatureRows): :func:`similarity_features` of the reference texts.
        corpus (FeatureRows): :func:`similarity_features` of a (seeded) subsample of training
            samples, one row per sample; its rows' scores give the percentile table and the
            spread ``b``.
        prior_words (float): Pseudo-features pulling the reference distribution towards the
            corpus'. Defaults to ``1e5``.
    """
    if not isinstance(reference, FeatureRows) or not isinstance(corpus, FeatureRows):
        raise SimilarityError('fit_similarity() takes similarity_features() rows of the reference '
                              'and of the corpus (topic term rows have no word pairs).')
    if not (np.isfinite(prior_words) and prior_words > 0):
        raise SimilarityError(f'prior_words must be a positive number, got {prior_words}.')
    if reference.num_buckets != corpus.num_buckets:
        raise SimilarityError('The reference and corpus features were hashed into different '
                              'bucket counts: extract both with the same num_buckets.')
    buckets = corpus.num_buckets
    _check_buckets(buckets)
    ref = np.bincount(reference.buckets, minlength=buckets).astype(np.float64)
    raw = np.bincount(corpus.buckets, minlength=buckets).astype(np.float64)
    if ref.sum() <= 0:
        raise SimilarityError('The reference has no words to compare with: give a reference set of '
                              'text (or tokens with the tokenizer they were made with).')
    if len(corpus) == 0 or raw.sum() <= 0:
        raise SimilarityError('The training subsample has no words: check --text-column / the '
                              'tokenizer of the training data.')
    p_raw = (raw + 1.0) / (raw.sum() + buckets)
    # log(p_ref / p_raw) with p_ref = (ref + prior p_raw) / (N_ref + prior), written so that every
    # feature the reference lacks gets bit-for-bit the same ratio.
    log_ratio = np.log(ref / p_raw + prior_words) - np.log(ref.sum() + prior_words)
    freq = raw / raw.sum()
    center = float(freq @ log_ratio)
    weights = _centred(log_ratio, center)
    sums, n = _row_sums(corpus, weights)
    has = n > 0
    noise, spread = _length_variance(sums[has] / n[has], n[has], float(freq @ weights ** 2))
    scores = _standardised(sums, n, noise, spread)
    return SimilarityModel(log_ratio, quantile_table(scores), center, noise, spread, {
        'buckets': buckets, 'prior_words': float(prior_words),
        'reference_features': float(ref.sum()), 'corpus_samples': len(corpus),
        'corpus_features': float(raw.sum())})


def saved_model_note(model_dirs: Sequence[str], names: Sequence[str]) -> Optional[str]:
    """One line on the similarity models saved beside several streams' labels, for ``mads inspect``:
    which model made the percentiles, and the relabel command if it is an old version or if the
    streams' labels come from models of different versions (their percentiles do not compare).

    Args:
        model_dirs (Sequence[str]): Each stream's saved-model directory (``mads/similarity``).
        names (Sequence[str]): The streams' names, in the same order.

    Returns:
        str, optional: The note; ``None`` when no stream has a saved model.
    """
    versions: dict[int, list[str]] = {}
    for directory, name in zip(model_dirs, names):
        if os.path.isfile(os.path.join(directory, 'similarity.json')):
            versions.setdefault(_read_meta(directory)['version'], []).append(name)
    if not versions:
        return None
    if len(versions) > 1:
        which = '; '.join(f'version {v} ({SIMILARITY_FEATURES[v]}): {", ".join(n)}'
                          for v, n in sorted(versions.items()))
        return (f'similarity labels from models of different versions ({which}) do not compare: '
                f'relabel every stream together with {RELABEL}')
    (version, _), = versions.items()
    note = f'similarity model: version {version} ({SIMILARITY_FEATURES[version]})'
    if version != SIMILARITY_VERSION:
        note += f'; the current model is version {SIMILARITY_VERSION}: relabel with {RELABEL}'
    return note
