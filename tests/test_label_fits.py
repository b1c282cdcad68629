"""Streams labelled together or refused: the label manifest records which fit produced each column,
`MADSDataset` refuses streams whose topic fits differ (naming the command that labels them
together, or `--topics-from`), and a stream's default domain is its source's name, not its split
folder's.

Real text MDS streams in `<source>/train` split folders (as llm-foundry writes them), real
`mads label` / `mads inspect` runs and real `MADSDataset`s.
"""

from __future__ import annotations

import json
import os
import shlex
import warnings

import numpy as np
import pytest
from streaming import MDSWriter, Stream
from test_labeling import FOOD, SPACE, _doc

from streaming_mads import MADSDataset
from streaming_mads.labeling.inspect import inspect_dataset
from streaming_mads.labels import LabelError, read_manifest
from streaming_mads.run.cli import main

N = 24
LABEL = ['--topics', '2', '--workers', '1', '--no-progress']


def _source(root, name: str, vocab: list[str], seed: int) -> str:
    """One source's text stream in its `train` split folder."""
    out = os.path.join(str(root), name, 'train')
    rng = np.random.default_rng(seed)
    with MDSWriter(out=out, columns={'text': 'str'}, size_limit=1 << 12) as w:
        for _ in range(N):
            w.write({'text': _doc(rng, vocab)})
    return out


def _dataset(*split_dirs: str, agents=('topic', 'domain')) -> MADSDataset:
    streams = [Stream(local=os.path.dirname(d), split='train') for d in split_dirs]
    return MADSDataset(streams=streams, batch_size=2, pool_ratio=2, agents=list(agents),
                       shuffle=False)


def test_streams_labelled_apart_are_refused_then_topics_from_makes_them_one_fit(tmp_path, capsys):
    web, cooking = _source(tmp_path, 'web', SPACE, 0), _source(tmp_path, 'cooking', FOOD, 1)
    assert main(['label', web] + LABEL) == 0
    assert main(['label', cooking] + LABEL) == 0
    capsys.readouterr()
    for path, name in ((web, 'web'), (cooking, 'cooking')):  # Not 'train', the split folder.
        columns = read_manifest(path)['columns']
        assert columns['domain']['values'] == [name]
        assert columns['domain']['fit'] == {'source': 'stream'}
        assert columns['quality']['fit'] == {'scorer': 'heuristic'}
        assert columns['topic']['fit']['model'] == 'topics'
    fit_web = read_manifest(web)['columns']['topic']['fit']['id']
    fit_cooking = read_manifest(cooking)['columns']['topic']['fit']['id']
    assert fit_web != fit_cooking
    # mads inspect shows both fits, and each fit's own top terms.
    text = inspect_dataset(str(tmp_path))
    assert f'cooking: topics {fit_cooking}' in text and f'web: topics {fit_web}' in text
    assert f'fit {fit_web} of web' in text and f'fit {fit_cooking} of cooking' in text
    with pytest.raises(LabelError) as err:
        _dataset(web, cooking)
    msg = str(err.value)
    assert fit_web in msg and fit_cooking in msg
    assert f'`mads label {web} {cooking}`' in msg  # The command that labels them together.
    reuse = msg.split("reusing the first's model: `")[1].split('`')[0]
    assert reuse == f'mads label {cooking} --columns topic --topics-from {web}'
    # Following the message: the second stream assigned to the first's topics.
    assert main(shlex.split(reuse)[1:] + ['--workers', '1', '--no-progress']) == 0
    assert read_manifest(cooking)['columns']['topic']['fit']['id'] == fit_web
    ds = _dataset(web, cooking)
    assert [a.name for a in ds.agents] == ['topic', 'domain']
    assert set(ds.agents[1].value_names) == {'web', 'cooking'}
    del ds
    assert f'fit: topics {fit_web} (k=2, embedder=tfidf)' in inspect_dataset(str(tmp_path))


def test_streams_labelled_together_share_one_fit_and_old_manifests_warn(tmp_path):
    web, cooking = _source(tmp_path, 'web', SPACE, 0), _source(tmp_path, 'cooking', FOOD, 1)
    assert main(['label', web, cooking] + LABEL) == 0
    fits = {json.dumps(read_manifest(d)['columns']['topic']['fit']) for d in (web, cooking)}
    assert len(fits) == 1
    ds = _dataset(web, cooking)
    topic = ds.agents[0]
    assert topic.freq.sum() == 2 * N and (np.asarray(topic.freq) > 0).all()
    del ds
    for d in (web, cooking):  # As written before fits were recorded.
        path = os.path.join(d, 'mads', 'manifest.json')
        manifest = json.load(open(path))
        for entry in manifest['columns'].values():
            entry.pop('fit')
        json.dump(manifest, open(path, 'w'))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        ds = _dataset(web, cooking)
    del ds
    mine = [str(w.message) for w in caught if 'record no fit' in str(w.message)]
    assert len(mine) == 1 and f'mads label {web} {cooking}' in mine[0]


def test_one_domain_name_for_two_streams_is_refused(tmp_path, capsys):
    """Two `web` sources: refused when labelled together, and when labelled apart and joined."""
    a = _source(tmp_path / 'x', 'web', SPACE, 0)
    b = _source(tmp_path / 'y', 'web', FOOD, 1)
    assert main(['label', a, b, '--columns', 'domain', '--no-progress']) == 2
    assert "Two streams are both named 'web'" in capsys.readouterr().err
    for d in (a, b):
        assert main(['label', d, '--columns', 'domain', '--no-progress']) == 0
    with pytest.raises(LabelError, match=f"both got domain 'web'.*`mads label {a} {b}`"):
        _dataset(a, b, agents=['domain'])


def test_similarity_from_reuses_one_similarity_model(tmp_path):
    from streaming_mads.labeling.label import label_dataset
    from streaming_mads.labels import LabelStore, StreamLabels
    web, cooking = _source(tmp_path, 'web', SPACE, 0), _source(tmp_path, 'cooking', FOOD, 1)
    reference = _source(tmp_path, 'reference', SPACE, 2)
    label_dataset(web, columns=['similarity'], reference=reference, workers=1, progress=False)
    label_dataset(cooking, columns=['similarity'], similarity_from=web, workers=1, progress=False)
    fits = [read_manifest(d)['columns']['similarity']['fit'] for d in (web, cooking)]
    assert fits[0]['model'] == 'similarity' and fits[0]['id'] == fits[1]['id']
    store = LabelStore([StreamLabels(d, N, os.path.basename(os.path.dirname(d)))
                        for d in (web, cooking)], np.asarray([0, N]))
    assert store.info('similarity').kind == 'score'  # One model: accepted.
    label_dataset(cooking, columns=['similarity'], reference=reference, fit_samples=N // 2,
                  workers=1, progress=False)  # Its own fit, on other samples: refused.
    store = LabelStore([StreamLabels(d, N, os.path.basename(os.path.dirname(d)))
                        for d in (web, cooking)], np.asarray([0, N]))
    with pytest.raises(LabelError, match=f'--similarity-from {web}'):
        store.info('similarity')
