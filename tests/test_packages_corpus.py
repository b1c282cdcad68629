"""The packages corpus: deterministic, disjoint sets, a reference across domains, bounded size."""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
from files import file_tree

from streaming_mads.corpora.packages import DOMAINS, SHARES, build_packages_text

CODE_BYTES = 60_000
REFERENCE_BYTES = 15_000
EVALUATION_BYTES = 18_000
SMALL = dict(code_bytes=CODE_BYTES, reference_bytes=REFERENCE_BYTES,
             evaluation_bytes=EVALUATION_BYTES)


def hashes(directory: str) -> set[str]:
    return {hashlib.sha1(data).hexdigest() for data in file_tree(directory).values()}


def sizes(directory: str) -> list[int]:
    return [len(data) for data in file_tree(directory).values()]


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('packages') / 'text')
    return out, build_packages_text(out, **SMALL)


def test_two_builds_are_byte_identical(corpus, tmp_path):
    out, _ = corpus
    again = os.path.join(tmp_path, 'text')
    build_packages_text(again, **SMALL)
    assert file_tree(again) == file_tree(out)


def test_reference_and_evaluation_are_disjoint_and_never_trained_on(corpus):
    _, text = corpus
    reference, evaluation = hashes(text.reference), hashes(text.evaluation)
    assert reference and evaluation and not reference & evaluation
    for domain in DOMAINS:
        seen = hashes(text.train[domain]) | hashes(text.heldout[domain])
        assert not seen & (reference | evaluation), domain


def test_the_reference_is_not_one_domain(corpus):
    _, text = corpus
    for directory in (text.reference, text.evaluation):
        domains = {name.split('__')[0] for name in os.listdir(directory)}
        assert domains <= set(DOMAINS) - {'license', 'garbled'}
        assert len(domains) >= 2, domains
        # Its packages are a theme that every domain mixes with others.
        packages = {name.split('__')[1] for name in os.listdir(directory)}
        for domain in domains:
            trained = {name.split('__')[0] for name in os.listdir(text.train[domain])}
            assert len(trained - packages) > len(trained & packages), domain


def test_sizes_stay_within_limits(corpus):
    _, text = corpus
    for domain in DOMAINS:
        docs = sizes(text.train[domain]) + sizes(text.heldout[domain])
        assert docs and text.heldout[domain] and sizes(text.heldout[domain]), domain
        # The last document taken may overshoot the limit, no other.
        assert sum(docs) - max(docs) < SHARES[domain] * 1.6 * CODE_BYTES, domain
    for directory, limit in ((text.reference, REFERENCE_BYTES),
                             (text.evaluation, EVALUATION_BYTES)):
        docs = sizes(directory)
        assert sum(docs) - 3 * max(docs) < limit  # One overshoot per domain.


def test_prepared_packages_corpus_opens_as_a_mads_dataset(tmp_path):
    from streaming_mads import MADSDataset
    from streaming_mads.run.demo import prepare_data

    paths = prepare_data(str(tmp_path), code_bytes=CODE_BYTES, seq_len=64, vocab_size=512,
                         progress=False, corpus='packages')
    assert set(paths['heldout']) == set(DOMAINS)
    for directory in [paths['reference'], paths['evaluation'], *paths['heldout'].values()]:
        assert os.path.isfile(os.path.join(directory, 'index.json')), directory
    ds = MADSDataset(local=paths['data'], batch_size=4, pool_ratio=2, shuffle=False)
    assert [a.name for a in ds.agents] == ['quality', 'domain', 'topic', 'similarity']
    assert set(ds.agents[1].value_names) == set(DOMAINS)
    assert ds[0]['tokens'].shape == (64,)
    kept = [sample['tokens'] for _, sample in zip(range(8), ds)]
    assert len(kept) == 8
    del ds
    with pytest.raises(ValueError, match='corpus'):
        prepare_data(str(tmp_path / 'x'), code_bytes=1, seq_len=64, vocab_size=512,
                     progress=False, corpus='other')


@pytest.fixture(scope='module')
def collab(tmp_path_factory):
    from streaming_mads.corpora import build_collab_text
    return build_collab_text(str(tmp_path_factory.mktemp('collab') / 'text'), **SMALL)


def _packages_of(directory: str, first: int) -> list[str]:
    """The package of each document (its name's field ``first``)."""
    return [name.split('__')[first] for name in os.listdir(directory)]


def test_collab_target_is_one_domain_of_the_theme(corpus, collab):
    """The collaboration corpus' target crosses a domain with the theme, and the garbled domain
    carries damaged copies of the theme: neither the domain nor the theme alone finds it."""
    _, packages = corpus
    for directory in (collab.reference, collab.evaluation):
        assert {name.split('__')[0] for name in os.listdir(directory)} == {'docstrings'}
    reference, evaluation = hashes(collab.reference), hashes(collab.evaluation)
    assert reference and evaluation and not reference & evaluation
    for domain in DOMAINS:
        assert not (hashes(collab.train[domain]) | hashes(collab.heldout[domain])) & \
            (reference | evaluation), domain
    theme = set(_packages_of(collab.reference, 1)) | set(_packages_of(collab.evaluation, 1))
    # The target's domain is mostly other packages ...
    trained = _packages_of(collab.train['docstrings'], 0)
    assert sum(p in theme for p in trained) < len(trained) / 2
    # ... and the garbled domain carries the theme far more than the packages corpus' does.
    share = [np.mean([p in theme for p in _packages_of(text.train['garbled'], 0)])
             for text in (collab, packages)]
    assert share[0] >= 0.3 and share[0] > 2 * share[1]


def test_collab_settings_are_checked():
    from streaming_mads.corpora import build_collab_text
    with pytest.raises(ValueError, match='target_domains'):
        build_collab_text('unused', target_domains=('license',))
    with pytest.raises(ValueError, match='garbled_theme'):
        build_collab_text('unused', garbled_theme=2)
