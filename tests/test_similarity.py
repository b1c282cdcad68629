"""Reference similarity (``streaming_mads.labeling.similarity``): the label that carries a reference theme."""

import numpy as np
import pytest

from streaming_mads.labeling.similarity import SimilarityError, SimilarityModel, fit_similarity
from streaming_mads.labeling.topics import term_rows

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


def test_similarity_ranks_a_rare_theme_on_top_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    corpus, is_theme = _texts(rng, 2000, 0.06)
    reference, _ = _texts(rng, 20, 1.0)
    model = fit_similarity(term_rows(reference), term_rows(corpus))
    pct = model(corpus)
    assert pct.dtype == np.float32 and 0.0 <= pct.min() and pct.max() <= 1.0
    # Percentiles are those of the fitted corpus: about uniform.
    assert abs(float(np.mean(pct >= 0.9)) - 0.1) < 0.02
    # The 6% of theme texts are all in the top tenth, and the rest below it.
    assert pct[is_theme].min() >= 0.9 and np.mean(pct[~is_theme] >= 0.9) < 0.06
    # Held-out texts of the theme rank high too: the score is of words, not of seen texts.
    fresh, fresh_theme = _texts(np.random.default_rng(1), 200, 0.5)
    assert model(fresh)[fresh_theme].min() >= 0.9
    fresh_scores = model.scores(fresh)
    assert fresh_scores[fresh_theme].min() > fresh_scores[~fresh_theme].max()
    # A text with no words scores as low as any.
    assert model(['']).item() <= pct.min() + 1e-6
    model.save(str(tmp_path / 'sim'))
    loaded = SimilarityModel.load(str(tmp_path / 'sim'))
    assert np.array_equal(loaded(fresh), model(fresh))
    assert loaded.fingerprint() == model.fingerprint()
    assert loaded.info['corpus_samples'] == 2000


def test_similarity_prior_and_bad_input(tmp_path):
    rng = np.random.default_rng(2)
    corpus, _ = _texts(rng, 300, 0.1)
    reference, _ = _texts(rng, 5, 1.0)
    weak = fit_similarity(term_rows(reference), term_rows(corpus), prior_words=10.0)
    strong = fit_similarity(term_rows(reference), term_rows(corpus), prior_words=1e7)
    # A larger prior keeps the ratios nearer 1 (log 0): a small reference says less.
    assert np.abs(strong.log_ratio).max() < np.abs(weak.log_ratio).max()
    with pytest.raises(SimilarityError, match='reference has no words'):
        fit_similarity(term_rows(['', '123']), term_rows(corpus))
    with pytest.raises(SimilarityError, match='training subsample has no words'):
        fit_similarity(term_rows(reference), term_rows([]))
    with pytest.raises(SimilarityError, match='prior_words'):
        fit_similarity(term_rows(reference), term_rows(corpus), prior_words=0)
    with pytest.raises(SimilarityError, match='similarity.json missing'):
        SimilarityModel.load(str(tmp_path))
