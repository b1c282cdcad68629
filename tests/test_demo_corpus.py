"""The demo corpus: API pages beside the topics, sets disjoint from training, sized, ordered."""

from __future__ import annotations

import os

import pytest
from files import file_tree
from test_packages_corpus import hashes

from streaming_mads.corpora.demo import DOMAINS, _stdlib_files, build_demo_text

SMALL = dict(code_bytes=120_000, reference_bytes=20_000, evaluation_bytes=30_000)


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    out = str(tmp_path_factory.mktemp('demo') / 'text')
    return out, build_demo_text(out, **SMALL)


def test_a_rebuild_gives_the_same_bytes(corpus, tmp_path):
    assert file_tree(build_demo_text(str(tmp_path), **SMALL).evaluation) == \
        file_tree(corpus[1].evaluation)
    assert file_tree(str(tmp_path)) == file_tree(corpus[0])


def test_sets_are_documentation_never_trained_on(corpus):
    _, text = corpus
    reference, evaluation = hashes(text.reference), hashes(text.evaluation)
    assert reference and evaluation and not reference & evaluation
    for domain in DOMAINS:
        assert not (hashes(text.train[domain]) | hashes(text.heldout[domain])) & \
            (reference | evaluation), domain
    # A module whose page is evaluated gives no training document (its code holds its docstrings).
    for directory in (text.reference, text.evaluation):
        modules = {n.rsplit('__', 1)[0] for n in os.listdir(directory)
                   if n.endswith('.py__000.txt')}
        assert not modules & {n[:-len('.txt')] for n in os.listdir(text.train['code'])}
    pages = [n for n in os.listdir(text.train['docs']) if '.py__' in n]
    assert pages, 'the docs domain holds API pages beside the topics'
    page = open(os.path.join(text.train['docs'], sorted(pages)[0]), encoding='utf-8').read()
    assert len(page) > 300


def test_set_sizes_follow_their_byte_limits(corpus):
    _, text = corpus
    for directory, limit in ((text.reference, SMALL['reference_bytes']),
                             (text.evaluation, SMALL['evaluation_bytes'])):
        total = sum(len(d) for d in file_tree(directory).values())
        assert total >= limit  # Whole topics and pages until the limit: the last may overshoot.


def test_a_larger_corpus_extends_a_smaller_one():
    """The library's modules come first and its tests only after them, so a small corpus is a
    prefix of a large one."""
    small, large = _stdlib_files(200_000), _stdlib_files(15_000_000)
    assert large[:len(small)] == small
    tests = [is_test for _, is_test in large]
    assert any(tests) and tests == sorted(tests)  # All modules, then tests.


def test_bad_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match='evaluation_bytes'):
        build_demo_text(str(tmp_path), evaluation_bytes=0)
    with pytest.raises(ValueError, match='garbled_copies'):
        build_demo_text(str(tmp_path), garbled_copies=0)
