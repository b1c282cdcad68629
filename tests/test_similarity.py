"""Reference similarity (``streaming_mads.labeling.similarity``): the label that carries a reference theme."""

import json
import os
import zlib

import numpy as np
import pytest

from streaming_mads.labeling.similarity import (SIMILARITY_VERSION, FeatureRows, SimilarityError,
                                                SimilarityModel, fit_similarity, saved_model_note,
                                                similarity_features)
from streaming_mads.labeling.topics import term_rows
from streaming_mads.score_bins import SIMILARITY_BINS

THEME = 'tensor array gradient matrix algebra numerical kernel broadcast dtype'.split()
OTHER = ('request response server socket header cookie session proxy retry timeout license '
         'warranty copyright permission holder').split()
COMMON = 'value function return object module class method argument default option'.split()


def _texts(rng: np.random.Generator, n: int, theme_share: float) -> tuple[list[str], np.ndarray]:
    """Texts of 40 words: common words plus theme words (``theme_share`` of texts) or others."""
    is_theme = rng.random(n) < theme_share
    texts = []
    for t in is_theme:
        own = THEME if t else OTHER
        words = rng.choice(COMMON, 25).tolist() + rng.choice(own, 15).tolist()
        texts.append(' '.join(rng.permutation(words)))
    return texts, is_theme


def _fit(reference, corpus, **kw) -> SimilarityModel:
    return fit_similarity(similarity_features(reference), similarity_features(corpus), **kw)


def test_similarity_ranks_a_rare_theme_on_top_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    corpus, is_theme = _texts(rng, 2000, 0.06)
    reference, _ = _texts(rng, 20, 1.0)
    model = _fit(reference, corpus)
    pct = model(corpus)
    assert pct.dtype == np.float32 and 0.0 <= pct.min() and pct.max() <= 1.0
    # Percentiles are those of the fitted corpus: about uniform.
    assert abs(float(np.mean(pct >= 0.9)) - 0.1) < 0.02
    # The 6% of theme texts are all in the top tenth, and the rest below it.
    assert pct[is_theme].min() >= 0.9 and np.mean(pct[~is_theme] >= 0.9) < 0.06
    # Held-out texts of the theme rank high too: the score is of features, not of seen texts.
    fresh, fresh_theme = _texts(np.random.default_rng(1), 200, 0.5)
    assert model(fresh)[fresh_theme].min() >= 0.9
    fresh_scores = model.scores(fresh)
    assert fresh_scores[fresh_theme].min() > fresh_scores[~fresh_theme].max()
    # A text with no words carries no evidence: the corpus average, 0.
    assert model.scores(['', '...']).tolist() == [0.0, 0.0]
    model.save(str(tmp_path / 'sim'))
    meta = json.load(open(tmp_path / 'sim' / 'similarity.json'))
    assert meta['version'] == SIMILARITY_VERSION and 'bigrams' in meta['features']
    loaded = SimilarityModel.load(str(tmp_path / 'sim'))
    assert np.array_equal(loaded(fresh), model(fresh))
    assert loaded.fingerprint() == model.fingerprint()
    assert loaded.info['corpus_samples'] == 2000


def test_word_pairs_see_order():
    """A word-shuffled text scores lower than its original against a reference of ordered text:
    its words (unigrams) are the same, its pairs are not the reference's."""
    rng = np.random.default_rng(3)
    phrases = ['sparse matrix factorization', 'numerical linear algebra', 'gradient descent step',
               'fast fourier transform', 'random number generator', 'floating point error']
    filler = 'the a of and to in for with on by'.split()

    def ordered(k: int) -> str:
        parts = []
        for _ in range(k):
            parts += rng.choice(phrases).split() + rng.choice(filler, 2).tolist()
        return ' '.join(parts)

    reference = [ordered(20) for _ in range(30)]
    corpus = [ordered(8) if rng.random() < 0.3 else ' '.join(rng.permutation(ordered(8).split()))
              for _ in range(600)]
    model = _fit(reference, corpus)
    originals = [ordered(10) for _ in range(50)]
    shuffled = [' '.join(rng.permutation(t.split())) for t in originals]
    assert np.all(model.scores(originals) > model.scores(shuffled))
    # Words alone cannot tell them apart: their unigram counts are equal.
    rows, srows = term_rows(originals[:1]), term_rows(shuffled[:1])
    assert np.array_equal(rows.buckets, srows.buckets) and np.array_equal(rows.counts, srows.counts)


def _zipf_texts(rng: np.random.Generator, n: int, vocab: list[str],
                short_share: float) -> tuple[list[str], np.ndarray]:
    """Texts of a mixture of 6 topics (each a Zipf law over its own word order): ``short_share``
    of 2-6 words, the rest of 60-300."""
    size = len(vocab)
    orders = [rng.permutation(size) for _ in range(6)]
    texts, lengths = [], []
    for _ in range(n):
        length = int(rng.integers(2, 7)) if rng.random() < short_share else int(rng.integers(60, 300))
        p = np.empty(size)
        p[orders[rng.integers(6)]] = 1.0 / np.arange(1, size + 1)
        texts.append(' '.join(np.asarray(vocab)[rng.choice(size, length, p=p / p.sum())]))
        lengths.append(length)
    return texts, np.asarray(lengths)


def test_short_samples_do_not_fill_the_top_bins_without_signal():
    """A reference drawn from the corpus' own distribution says nothing: short samples, whose
    mean log-ratio is mostly noise, must then take about their share of the top bins (the plain
    mean put them in nearly all of the top twentieth)."""
    rng = np.random.default_rng(0)
    vocab = [f'w{chr(97 + i // 26)}{chr(97 + i % 26)}x{chr(97 + i % 7)}' for i in range(600)]
    vocab = list(dict.fromkeys(vocab))
    corpus, lengths = _zipf_texts(rng, 2500, vocab, 0.3)
    reference, _ = _zipf_texts(rng, 200, vocab, 0.3)
    model = _fit(reference, corpus)
    pct = model(corpus)
    short = lengths < 10
    for edge, slack in ((0.9, 1.35), (0.95, 1.6)):
        top = pct >= edge
        assert float(np.mean(short[top])) < slack * float(np.mean(short)), edge
    # The score is standardised per length: about unit spread for short and long alike.
    z = model.scores(corpus)
    assert 0.8 < z[short].std() < 1.25 and 0.8 < z[~short].std() < 1.25


def test_equally_dissimilar_samples_share_one_bin():
    """Samples with no feature in common with the reference, all of one length, tie exactly; as a
    block they go to the bin of their mid-rank, whatever edges fall inside the block."""
    rng = np.random.default_rng(4)
    reference = [' '.join(rng.choice(THEME, 30)) for _ in range(10)]
    apart = [' '.join(rng.choice(OTHER, 30)) for _ in range(600)]
    near = [' '.join(rng.choice(THEME + COMMON, 30)) for _ in range(100)]
    model = _fit(reference, apart + near)
    pct = model(apart)
    assert len(np.unique(pct)) == 1
    assert len(np.unique(np.searchsorted(SIMILARITY_BINS.edges, pct, side='right'))) == 1
    assert 0.3 < pct[0] < 0.5  # Ranks 0-599 of 700: the middle is the 43rd percentile.
    assert model(near).min() > pct[0]


def test_features_are_stable_across_processes():
    """Buckets depend on the words' bytes only (CRC-32 and fixed multipliers, as written out
    here), never on Python's per-process salted ``hash``."""
    texts = ['Numerical linear algebra, on sparse matrices.', 'x', '']
    rows = similarity_features(texts)
    assert rows.lengths().tolist() == [11, 1, 0]  # 6 words and 5 pairs; 1 word; none.
    crc = [zlib.crc32(w.encode()) for w in ('numerical', 'linear')]
    word = ((crc[0] * 0x9E3779B97F4A7C15) % 2 ** 64) >> (64 - 18)
    pair = ((((crc[0] << 32) | crc[1]) * 0xC2B2AE3D27D4EB4F) % 2 ** 64) >> (64 - 18)
    assert rows.buckets[0] == word and rows.buckets[6] == pair
    halves = FeatureRows.concat([similarity_features(texts[:1]), similarity_features(texts[1:])])
    assert np.array_equal(halves.indptr, rows.indptr) and np.array_equal(halves.buckets, rows.buckets)


def test_version_1_models_load_and_are_recognised(tmp_path):
    rng = np.random.default_rng(5)
    corpus, _ = _texts(rng, 300, 0.1)
    reference, _ = _texts(rng, 5, 1.0)
    new = tmp_path / 'new' / 'similarity'
    _fit(reference, corpus).save(str(new))
    # A model as the unigram release saved it.
    old = tmp_path / 'old' / 'similarity'
    old.mkdir(parents=True)
    np.save(old / 'log_ratio.npy', np.zeros(1 << 16))
    np.save(old / 'quantiles.npy', np.linspace(-1, 1, 1001))
    (old / 'similarity.json').write_text(json.dumps({
        'format': 'mads-similarity', 'version': 1, 'buckets': 1 << 16, 'prior_words': 1e5}))
    loaded = SimilarityModel.load(str(old))
    assert loaded.version == 1 and loaded.info['prior_words'] == 1e5
    with pytest.raises(SimilarityError, match='version 1 .*relabel with `mads label'):
        loaded(['some text'])
    note = saved_model_note([str(old)], ['a'])
    assert 'version 1' in note and 'relabel' in note
    assert 'relabel' not in saved_model_note([str(new)], ['b'])
    mixed = saved_model_note([str(old), str(new), str(tmp_path / 'none')], ['a', 'b', 'c'])
    assert 'different versions' in mixed and ': a' in mixed and ': b' in mixed
    assert saved_model_note([str(tmp_path / 'none')], ['c']) is None
    (old / 'similarity.json').write_text(json.dumps({'format': 'mads-similarity', 'version': 9}))
    with pytest.raises(SimilarityError, match='version 9.*upgrade'):
        SimilarityModel.load(str(old))


def test_similarity_prior_and_bad_input(tmp_path):
    rng = np.random.default_rng(2)
    corpus, _ = _texts(rng, 300, 0.1)
    reference, _ = _texts(rng, 5, 1.0)
    weak = _fit(reference, corpus, prior_words=10.0)
    strong = _fit(reference, corpus, prior_words=1e7)
    # A larger prior keeps the ratios nearer 1 (log 0): a small reference says less.
    assert np.abs(strong.log_ratio).max() < np.abs(weak.log_ratio).max()
    with pytest.raises(SimilarityError, match='reference has no words'):
        _fit(['', '...'], corpus)
    with pytest.raises(SimilarityError, match='training subsample has no words'):
        _fit(reference, [])
    with pytest.raises(SimilarityError, match='prior_words'):
        _fit(reference, corpus, prior_words=0)
    with pytest.raises(SimilarityError, match='topic term rows have no word pairs'):
        fit_similarity(term_rows(reference), term_rows(corpus))
    with pytest.raises(SimilarityError, match='num_buckets'):
        similarity_features(reference, num_buckets=1000)
    with pytest.raises(SimilarityError, match='num_buckets=262144'):
        weak.feature_scores(similarity_features(reference, num_buckets=1 << 10))
    with pytest.raises(SimilarityError, match='similarity.json missing'):
        SimilarityModel.load(str(tmp_path))


def test_inspect_names_the_model_version_of_each_stream(tmp_path):
    """``mads inspect`` says which model made the similarity percentiles, and asks for a relabel
    when streams mix the old unigram model with the current one."""
    from streaming import MDSWriter

    from streaming_mads.labeling.inspect import inspect_dataset
    from streaming_mads.labels import labels_dir, score, write_labels
    rng = np.random.default_rng(6)
    corpus, _ = _texts(rng, 200, 0.1)
    reference, _ = _texts(rng, 5, 1.0)
    model = _fit(reference, corpus)
    for name in ('a', 'b'):
        with MDSWriter(out=str(tmp_path / name), columns={'text': 'str'}) as writer:
            for text in corpus[:40]:
                writer.write({'text': text})
        write_labels(str(tmp_path / name), {'similarity': score(model(corpus[:40]))})
        model.save(os.path.join(labels_dir(str(tmp_path / name)), 'similarity'))
    text = inspect_dataset(str(tmp_path))
    assert f'similarity model: version {SIMILARITY_VERSION}' in text and 'relabel' not in text
    old = os.path.join(labels_dir(str(tmp_path / 'a')), 'similarity', 'similarity.json')
    meta = json.load(open(old))
    json.dump({**meta, 'version': 1}, open(old, 'w'))
    text = inspect_dataset(str(tmp_path))
    assert 'different versions' in text and 'relabel every stream together' in text
