"""A remote dataset works like a local one: `mads label` and `mads train` on a local S3 server.

`mads convert` output (two streams, a trained BPE tokenizer) is uploaded to a moto S3 server;
`mads label s3://...` must say what it uploaded and where its local copy is (and delete it on
request), and `mads train` must find the vocabulary and the tokenizer of a text reference in the
remote `mads_convert.json`, with nothing set by hand.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

pytest.importorskip('moto.server')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'benchmarks'))
from common import local_s3, upload_dir  # noqa: E402

from streaming_mads.checks import REMOTE_CONVERT_DIRNAME  # noqa: E402
from streaming_mads.run.cli import main  # noqa: E402
from streaming_mads.convert.convert import convert  # noqa: E402
from streaming_mads.run.train import build_trainer  # noqa: E402

SEQ = 16
WORDS = 'the data model loader stream shard agent weight sample token batch epoch'.split()


def _jsonl(path: str, seed: int, docs: int) -> str:
    rng = np.random.default_rng(seed)
    with open(path, 'w') as f:
        for _ in range(docs):
            f.write('{"text": "%s"}\n' % ' '.join(rng.choice(WORDS, 40)))
    return path


@pytest.fixture
def remote_corpus(tmp_path):
    """`mads convert --layout streams --tokenizer train` output on S3 at s3://data/corpus."""
    out = os.path.join(tmp_path, 'corpus')
    convert([f'web={_jsonl(os.path.join(tmp_path, "web.jsonl"), 0, 50)}',
             f'code={_jsonl(os.path.join(tmp_path, "code.jsonl"), 1, 50)}'], out,
            layout='streams', seq_len=SEQ, tokenizer='train', vocab_size=300, progress=False)
    with local_s3('data') as client:
        upload_dir(client, out, 'data', 'corpus')
        try:
            yield client
        finally:  # moto keeps buckets across servers in one process: leave none for others.
            for key in _keys(client, ''):
                client.delete_object(Bucket='data', Key=key)


def _keys(client, prefix: str) -> set[str]:
    pages = client.get_paginator('list_objects_v2').paginate(Bucket='data', Prefix=prefix)
    return {o['Key'] for page in pages for o in page.get('Contents', [])}


def test_label_reports_uploads_and_cache_then_train_needs_nothing_by_hand(remote_corpus, tmp_path,
                                                                         capsys):
    cache = os.path.join(tmp_path, 'label-cache')
    args = ['label', 's3://data/corpus', '--local', cache, '--columns', 'domain,quality',
            '--workers', '1', '--no-progress']
    assert main(args) == 0
    out = capsys.readouterr().out
    for stream in ('web', 'code'):
        assert f'of {stream} to s3://data/corpus/{stream}: mads/' in out, out
        assert f'corpus/{stream}/mads/manifest.json' in _keys(remote_corpus, 'corpus/')
    assert 'mads/manifest.json' in out and f'local cache: {cache} (' in out
    assert os.path.isdir(os.path.join(cache, 'web'))  # The shards' copy, as reported.

    assert main([*args, '--clean-cache']) == 0
    assert f'deleted the local cache {cache}' in capsys.readouterr().out
    assert not os.path.exists(cache)

    train_cache = os.path.join(tmp_path, 'train-cache')
    reference = _jsonl(os.path.join(tmp_path, 'reference.jsonl'), 2, 10)
    cfg = {
        'max_seq_len': SEQ, 'global_train_batch_size': 4, 'max_duration': '2ba',
        'model': {'preset': 'tiny', 'n_embd': 32},  # No vocab_size: read from the remote.
        'train_loader': {'name': 'mads', 'dataset': {
            'streams': {s: {'remote': f's3://data/corpus/{s}',
                            'local': os.path.join(train_cache, s)} for s in ('web', 'code')},
            'pool_ratio': 2, 'agents': ['quality', 'domain']}},
        # A text reference, tokenised with the remote's tokenizer (no reference_tokenizer).
        'algorithms': {'mads_console': {'reference': reference, 'update_interval': 2,
                                        'probe_size': 4, 'reference_size': 4}},
    }
    trainer = build_trainer(cfg)
    assert trainer.state.model.model.get_input_embeddings().num_embeddings == 300
    assert os.path.isfile(os.path.join(train_cache, 'web', REMOTE_CONVERT_DIRNAME, 'parent',
                                       'mads_convert.json'))
    trainer.fit()
    algo = trainer.state.algorithms[0]
    assert int(trainer.state.timestamp.batch) == 2 and len(algo.console.reference) > 0
    assert max(int(np.max(s['tokens'])) for s in algo.console.reference) >= 257  # BPE merges.
    trainer.close()


def test_clean_cache_refuses_a_local_dataset(tmp_path, capsys):
    out = os.path.join(tmp_path, 'local')
    convert([f'web={_jsonl(os.path.join(tmp_path, "web.jsonl"), 0, 20)}'], out, layout='single',
            seq_len=SEQ, tokenizer='bytes', progress=False)
    assert main(['label', out, '--columns', 'quality', '--clean-cache', '--workers', '1',
                 '--no-progress']) == 2
    assert 'is local (it is the data itself): drop --clean-cache' in capsys.readouterr().err
    assert os.path.isfile(os.path.join(out, 'index.json'))
