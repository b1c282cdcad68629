"""Sidecar labels: writer, reader, remote download, and the errors bad labels get."""

from __future__ import annotations

import gc
import json
import os
import shutil

import numpy as np
import pytest
from conftest import DOMAINS, label_arrays, write_labelled_stream, write_stream
from streaming import MDSWriter

from streaming_mads import LabelError, MADSDataset, categorical, score, write_labels
from streaming_mads.labels import LabelStore, StreamLabels, labels_dir


def test_write_and_read_round_trip(mds_dir):
    labels = StreamLabels(mds_dir, 600, 'data')
    assert set(labels.columns) == {'domain', 'quality', 'topic'}
    dom = labels.array('domain')
    assert isinstance(dom, np.memmap) and dom.dtype == np.uint8
    np.testing.assert_array_equal(dom, label_arrays(np.arange(600))['domain'])
    np.testing.assert_allclose(labels.array('quality'), label_arrays(np.arange(600))['quality'],
                               rtol=1e-6)
    assert labels.columns['domain']['counts'] == [150] * 4


def test_a_missing_column_names_the_command_that_writes_it(mds_dir):
    from streaming_mads.selection.agents import build_agent
    labels = StreamLabels(mds_dir, 600, 'data')
    store = LabelStore([labels], np.zeros(1, np.int64))
    with pytest.raises(LabelError, match='mads label DATA --reference REF'):
        build_agent('similarity').bind(store)
    with pytest.raises(LabelError, match="no label column 'ppl'.*label it with that column"):
        build_agent({'name': 'ppl', 'bins': [1.0]}).bind(store)


def test_merge_keeps_other_columns_and_names_vocabulary(mds_dir):
    write_labels(mds_dir, {'ppl': score(np.linspace(0, 1, 600))})
    cols = StreamLabels(mds_dir, 600, 'data').columns
    assert set(cols) == {'domain', 'quality', 'topic', 'ppl'}
    names = np.array(['b', 'a', 'b'] * 200)
    write_labels(mds_dir, {'src': categorical(names)})
    labels = StreamLabels(mds_dir, 600, 'data')
    assert labels.columns['src']['values'] == ['a', 'b']
    np.testing.assert_array_equal(labels.array('src')[:3], [1, 0, 1])


def test_streams_merge_vocabularies(tmp_path):
    a = write_stream(os.path.join(tmp_path, 'a'), range(100))
    b = write_stream(os.path.join(tmp_path, 'b'), range(100, 150))
    write_labels(a, {'domain': categorical(['web'] * 100)})
    write_labels(b, {'domain': categorical(['code'] * 25 + ['web'] * 25)})
    store = LabelStore([StreamLabels(a, 100, 'a'), StreamLabels(b, 50, 'b')], np.array([0, 100]))
    info = store.info('domain')
    assert info.values == ('web', 'code') and info.counts.tolist() == [125, 25]
    np.testing.assert_array_equal(store.gather('domain', np.array([5, 100, 130, 99])), [0, 1, 0, 0])


def test_remote_labels_are_downloaded_with_the_stream(tmp_path):
    remote = write_labelled_stream(os.path.join(tmp_path, 'remote'), range(200))
    local = os.path.join(tmp_path, 'cache')
    ds = MADSDataset(remote=remote, local=local, batch_size=4, pool_ratio=2)
    assert os.path.isfile(os.path.join(labels_dir(local), 'manifest.json'))
    assert [a.name for a in ds.agents] == ['quality', 'domain', 'topic']
    assert ds.agents[1].value_names == DOMAINS
    ids = np.array([0, 1, 2, 3, 199])
    np.testing.assert_array_equal(ds.label_ids(ids)[1], label_arrays(ids)['domain'])


def test_remote_without_labels_names_the_fix(tmp_path):
    remote = write_stream(os.path.join(tmp_path, 'remote'), range(50))
    with pytest.raises(LabelError, match='mads label'):
        MADSDataset(remote=remote, local=os.path.join(tmp_path, 'cache'), batch_size=4)


def _expect_error(local: str, match: str, **kwargs) -> None:
    with pytest.raises((LabelError, ValueError), match=match):
        MADSDataset(local=local, batch_size=4, pool_ratio=2, **kwargs)
    gc.collect()


def test_missing_labels(tmp_path):
    data = write_stream(os.path.join(tmp_path, 'd'), range(40))
    _expect_error(data, r'no MADS labels .*mads label')


def test_wrong_sample_count(tmp_path, mds_dir):
    other = write_labelled_stream(os.path.join(tmp_path, 'other'), range(500))
    shutil.rmtree(labels_dir(mds_dir))
    shutil.copytree(labels_dir(other), labels_dir(mds_dir))
    _expect_error(mds_dir, r'cover 500 samples but the stream has 600')


def test_stale_fingerprint(mds_dir):
    with open(os.path.join(mds_dir, 'index.json')) as f:
        index = json.load(f)
    with open(os.path.join(mds_dir, 'index.json'), 'w') as f:
        json.dump(index, f, indent=2)  # Same samples, rewritten index.
    _expect_error(mds_dir, r'stale.*Re-label')


def _drop_checksums(split_dir: str) -> None:
    """Make the manifest look like one written before column checksums existed, so the checks
    behind the checksum (length, ids) are what a bad file meets."""
    path = os.path.join(labels_dir(split_dir), 'manifest.json')
    with open(path) as f:
        manifest = json.load(f)
    for entry in manifest['columns'].values():
        entry.pop('checksum')
    with open(path, 'w') as f:
        json.dump(manifest, f)


def test_unknown_value_id(mds_dir):
    path = os.path.join(labels_dir(mds_dir), 'domain.npy')
    arr = np.load(path)
    arr[17] = 9
    np.save(path, arr)
    _expect_error(mds_dir, r'domain.npy .* is corrupt: its bytes do not match the checksum')
    _drop_checksums(mds_dir)
    _expect_error(mds_dir, r'value id 9, unknown to its vocabulary of 4')


def test_absent_column(mds_dir):
    _expect_error(mds_dir, r"no label column 'ppl'", agents=[{'name': 'ppl', 'bins': [1.0]}])


def test_column_of_the_wrong_kind(mds_dir):
    _expect_error(mds_dir, r"drop its `bins`", agents=[{'name': 'd', 'column': 'domain',
                                                         'bins': [1.0]}])
    _expect_error(mds_dir, r'give it `bins`', agents=[{'name': 'q', 'column': 'quality'}])


def test_truncated_column_file(mds_dir):
    path = os.path.join(labels_dir(mds_dir), 'topic.npy')
    np.save(path, np.load(path)[:-3])
    _drop_checksums(mds_dir)
    _expect_error(mds_dir, r'597 values for 600 samples')


@pytest.mark.parametrize('column,damage,checksums', [
    ('quality', 'flip', True),  # In-range floats: only the checksum can tell.
    ('topic', 'truncate', True),
    ('domain', 'header', True),
    ('topic', 'truncate', False),  # Labels written before checksums: numpy's own errors.
    ('domain', 'header', False),
])
def test_corrupt_column_file_names_the_file_and_the_fix(mds_dir, column, damage, checksums):
    path = os.path.join(labels_dir(mds_dir), f'{column}.npy')
    data = bytearray(open(path, 'rb').read())
    if damage == 'flip':
        data[-40:-36] = np.float32(2.5).tobytes()  # In range, finite: looks normal.
    elif damage == 'truncate':
        data = data[:len(data) // 2]
    else:
        data[:6] = b'garbag'
    with open(path, 'wb') as f:
        f.write(bytes(data))
    if not checksums:
        _drop_checksums(mds_dir)
    labels = StreamLabels(mds_dir, 600, 'data')
    fix = f'mads label {mds_dir} --columns {column}'
    with pytest.raises(LabelError, match=rf'{column}\.npy .*corrupt.*{fix}'):
        labels.array(column)
    assert open(path, 'rb').read() == bytes(data)  # Nothing was deleted or rewritten.


def test_labels_are_bound_to_shard_content(tmp_path):
    """Two uncompressed corpora of the same sample count and sample size have byte-identical
    index.json files (Streaming records no hashes by default): labels copied from one to the
    other must be refused because their shards differ."""
    def corpus(name, offset):
        out = os.path.join(tmp_path, name)
        with MDSWriter(out=out, columns={'tokens': 'ndarray:int32:8'}, compression=None) as w:
            for i in range(300):
                w.write({'tokens': np.arange(8, dtype=np.int32) + i + offset})
        return out
    a, b = corpus('a', 0), corpus('b', 1000)
    assert open(os.path.join(a, 'index.json'), 'rb').read() == \
        open(os.path.join(b, 'index.json'), 'rb').read()
    write_labels(a, {'quality': score(np.linspace(0, 5, 300))})
    shutil.copytree(labels_dir(a), labels_dir(b))
    StreamLabels(a, 300, 'a').array('quality')  # Its own labels open.
    with pytest.raises(LabelError, match=r'for other shards: .*shard\.00000\.mds.*Re-label'):
        StreamLabels(b, 300, 'b')
    # Relabelling b replaces the copy (the copied columns are not merged into b's labels).
    write_labels(b, {'domain': categorical(['x'] * 300)})
    assert set(StreamLabels(b, 300, 'b').columns) == {'domain'}


@pytest.mark.parametrize('kwargs,match', [
    (dict(batch_size=None), 'batch_size'),
    (dict(batch_size=4, pool_ratio=0.5), 'pool_ratio'),
    (dict(batch_size=4, pool_ratio=1.3), 'whole number'),
    (dict(batch_size=4, temperature=-1), 'temperature'),
    (dict(batch_size=4, agents=['nope']), 'Unknown agent preset'),
    (dict(batch_size=4, agents=['domain', 'domain']), 'unique'),
])
def test_bad_arguments(mds_dir, kwargs, match):
    with pytest.raises(ValueError, match=match):
        MADSDataset(local=mds_dir, **kwargs)
    gc.collect()


def test_writer_rejects_bad_columns(mds_dir):
    with pytest.raises(LabelError, match='one value per sample'):
        write_labels(mds_dir, {'x': score(np.zeros(5))})
    with pytest.raises(LabelError, match='NaN'):
        write_labels(mds_dir, {'x': score(np.full(600, np.nan))})
    with pytest.raises(LabelError, match='outside its vocabulary'):
        write_labels(mds_dir, {'x': categorical(np.full(600, 3), ['a', 'b'])})
    # Nothing was lost: the existing labels still load.
    assert set(StreamLabels(mds_dir, 600, 'data').columns) == {'domain', 'quality', 'topic'}
