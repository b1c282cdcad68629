"""Untrusted remotes: names in a dataset's metadata never reach outside its cache folder.

A bucket is shared: whoever wrote a dataset controls its ``index.json`` (shard file names),
``mads/manifest.json`` (label file names) and ``mads_convert.json`` (tokenizer path and files,
stream paths). Each crafted remote here once deleted, wrote or overwrote a file outside the cache
(or read one outside a local dataset); now each is refused, with an error naming the metadata
file and the bad name, before anything is read, written or deleted through it. Every remote case
runs with a local folder as the remote and with a moto S3 server, and checks that nothing outside
the cache changed: every file keeps its bytes and modification time, and no file or folder
appears or disappears.
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
import shutil
import sys
import uuid

import numpy as np
import pytest

from conftest import write_labelled_stream, write_stream
from streaming_mads.checks import stream_convert_info
from streaming_mads.convert_record import (ConvertError, make_convert_info, read_convert_info,
                                           write_convert_info)
from streaming_mads.labeling.streams import LabelingError, read_index
from streaming_mads.labels import LabelError, StreamLabels, categorical, write_labels
from streaming_mads.remote import UnsafePathError, contained_path
from streaming_mads.run.cli import main
from streaming_mads.run.loader import build_dataloader
from streaming_mads.selection.dataset import MADSDataset
from streaming_mads.tokenizer import TokenizerError, tokenizer_from_record

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'benchmarks'))

BUCKET = 'untrusted'
OLD = 1_000_000_000  # A modification time (2001) that no write made by a test can keep.


# ----------------------------------------------------------------------------------------------
# Helpers: the tree outside the cache, a sentinel, crafted datasets, remotes.


def _tree(root: str, skip: str) -> dict[str, object]:
    """Every file and folder under ``root`` except ``skip``: path -> (size, mtime, sha256)."""
    out: dict[str, object] = {}
    skip = os.path.abspath(skip)
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if os.path.abspath(os.path.join(dirpath, d)) != skip]
        for d in dirnames:
            out[os.path.join(dirpath, d) + '/'] = None
        for name in filenames:
            path = os.path.join(dirpath, name)
            with open(path, 'rb') as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            st = os.stat(path)
            out[path] = (st.st_size, st.st_mtime_ns, digest)
    return out


def _file(path: str, data: bytes) -> str:
    """Write ``data`` at ``path`` with an old modification time; return the absolute path."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'wb') as f:
        f.write(data)
    os.utime(path, (OLD, OLD))
    return os.path.abspath(path)


def _edit_json(path: str, edit) -> None:
    with open(path) as f:
        obj = json.load(f)
    edit(obj)
    with open(path, 'w') as f:
        json.dump(obj, f)


def _set_basename(split_dir: str, name: str, key: str = 'zip_data', shard: int = 0) -> None:
    """Rename the stored file of one shard in ``index.json`` (the file itself stays)."""
    _edit_json(os.path.join(split_dir, 'index.json'),
               lambda idx: idx['shards'][shard][key].__setitem__('basename', name))


def _stream(path: str, labelled: bool = False) -> str:
    """A small zstd MDS stream (40 samples in a few shards), with labels if asked."""
    write = write_labelled_stream if labelled else write_stream
    return write(path, range(40), size_limit=1 << 10)


def _record(root: str, tokenizer: dict) -> None:
    """A ``mads_convert.json`` of one stream (the ``single`` layout) with ``tokenizer``."""
    write_convert_info(root, make_convert_info(
        mode='tokens', layout='single', seq_len=8, columns={'id': 'int', 'tokens': 'ndarray:int32'},
        tokenizer={'kind': 'tokenizers', 'vocab_size': 300, 'eos_id': 0, **tokenizer},
        streams=[{'name': 'web', 'path': '', 'domains': ['web'], 'samples': 40}],
        domains={}, inputs=[], options={}))


def _cache(tmp_path, *parts: str) -> str:
    """A cache folder to be, its parent made (the cache and its contents may change)."""
    cache = os.path.join(tmp_path, *parts)
    os.makedirs(os.path.dirname(cache), exist_ok=True)
    return cache


def _refused(err: BaseException, source: str, name: str) -> None:
    """The error names the metadata file, the bad name, and says the metadata is untrusted."""
    msg = str(err)
    assert source in msg and repr(name) in msg and 'untrusted' in msg, msg


@pytest.fixture(scope='module')
def s3_client():
    """One moto S3 server for the module (bucket ``untrusted``)."""
    pytest.importorskip('moto.server')
    from common import local_s3
    with local_s3(BUCKET) as client:
        yield client


@pytest.fixture(params=['folder', 's3'])
def publish(request):
    """Make a local directory a remote: the folder itself, or its copy on the S3 server."""
    if request.param == 'folder':
        yield lambda directory: directory
        return
    client = request.getfixturevalue('s3_client')
    from common import upload_dir
    prefix = uuid.uuid4().hex

    def upload(directory: str) -> str:
        upload_dir(client, directory, BUCKET, f'{prefix}/{os.path.basename(directory)}')
        return f's3://{BUCKET}/{prefix}/{os.path.basename(directory)}'

    yield upload
    pages = client.get_paginator('list_objects_v2').paginate(Bucket=BUCKET, Prefix=prefix)
    for page in pages:  # moto keeps buckets across servers in one process: leave nothing.
        for obj in page.get('Contents', []):
            client.delete_object(Bucket=BUCKET, Key=obj['Key'])


@pytest.fixture
def opened(monkeypatch):
    """Absolute paths passed to ``open`` in this process while the test runs."""
    seen: list[str] = []
    real = builtins.open

    def recording_open(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            seen.append(os.path.abspath(os.fsdecode(file)))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, 'open', recording_open)
    return seen


class _Failed(Exception):
    """``mads label`` exited with its error status (the message: its stderr)."""


def _label(remote: str, cache: str, capsys) -> None:
    """``mads label REMOTE --local CACHE`` (domains from a column: every shard is read), which
    must fail: raises :class:`_Failed` with its stderr."""
    rc = main(['label', remote, '--local', cache, '--columns', 'domain', '--domain-from',
               'column:id', '--workers', '1', '--no-progress'])
    err = capsys.readouterr().err
    assert rc == 2, err
    raise _Failed(err)


def _refuse(tmp_path, cache: str, error: type[Exception], call) -> BaseException:
    """``call()`` must raise ``error`` and leave all under ``tmp_path`` but ``cache`` as it was."""
    before = _tree(str(tmp_path), cache)
    with pytest.raises(error) as err:
        call()
    assert _tree(str(tmp_path), cache) == before
    return err.value


# ----------------------------------------------------------------------------------------------
# The validator.


@pytest.mark.parametrize('name', ['shard.00000.mds', 'shard.00000.mds.zstd', 'tokenizer/vocab.json',
                                  'a/b/c.npy', '1_Pooling/config.json', '..shard', 'x..y'])
def test_plain_relative_names_are_joined(tmp_path, name):
    assert contained_path(str(tmp_path), name, 'a test') == os.path.join(str(tmp_path), name)


@pytest.mark.parametrize('name', ['/etc/passwd', '//host/share/x', '..', '../x', 'a/../../x',
                                  'a/../b', './x', 'a/./b', 'a//b', 'a/', '', '.', 'C:\\x', 'C:x',
                                  'c:/x', 'a\\..\\..\\x', '\\\\host\\share', 'a\x00b', None, 3,
                                  ['x']])
def test_unsafe_names_are_refused(tmp_path, name):
    with pytest.raises(UnsafePathError) as err:
        contained_path(str(tmp_path), name, 'a shard file name in /data/index.json')
    _refused(err.value, '/data/index.json', name)
    with pytest.raises(LabelError):  # The caller's own error class, when it passes one.
        contained_path(str(tmp_path), name, 'a label file', LabelError)


# ----------------------------------------------------------------------------------------------
# The five crafted remotes.


def test_absolute_shard_basename_cannot_delete_a_file(tmp_path, publish, capsys):
    """(1) ``mads label`` once deleted the file an absolute shard basename named."""
    sentinel = _file(os.path.join(tmp_path, 'outside', 'sentinel.bin'), b'precious')
    src = _stream(os.path.join(tmp_path, 'src', 'ds'))
    _set_basename(src, sentinel)
    remote = publish(src)
    cache = _cache(tmp_path, 'work', 'cache')
    err = _refuse(tmp_path, cache, _Failed, lambda: _label(remote, cache, capsys))
    _refused(err, os.path.join(cache, 'index.json'), sentinel)


def test_absolute_tokenizer_file_cannot_delete_a_file(tmp_path, publish, capsys):
    """(2) A tokenizer file of ``mads_convert.json`` given as an absolute path was deleted."""
    sentinel = _file(os.path.join(tmp_path, 'outside', 'sentinel.bin'), b'precious')
    src = _stream(os.path.join(tmp_path, 'src', 'ds'))
    _record(src, {'path': 'tokenizer/tokenizer.json', 'files': ['tokenizer.json', sentinel]})
    remote = publish(src)
    cache = _cache(tmp_path, 'work', 'cache')
    err = _refuse(tmp_path, cache, _Failed, lambda: _label(remote, cache, capsys))
    _refused(err, os.path.join(cache, 'mads_convert.json'), sentinel)


def test_dotdot_shard_basename_cannot_write_outside_the_cache(tmp_path, publish, capsys):
    """(3) ``../../x.zstd`` as a shard basename was downloaded beside the cache, and the run
    succeeded (the remote holds a real shard at that relative place)."""
    src = _stream(os.path.join(tmp_path, 'src', 'r', 'ds'))
    shard = os.path.join(src, 'shard.00000.mds.zstd')
    shutil.copyfile(shard, os.path.join(tmp_path, 'src', 'x.zstd'))
    _set_basename(src, '../../x.zstd')
    remote = publish(src)
    cache = _cache(tmp_path, 'work', 'a', 'cache')
    err = _refuse(tmp_path, cache, _Failed, lambda: _label(remote, cache, capsys))
    _refused(err, os.path.join(cache, 'index.json'), '../../x.zstd')  # And no work/x.zstd.


def test_dotdot_label_file_cannot_land_outside_local(tmp_path, publish):
    """(4) ``MADSDataset(remote=..., local=...)`` fetched a label file named ``../../../x`` in
    the remote's manifest to beside ``local``."""
    src = _stream(os.path.join(tmp_path, 'src', 'r', 'ds'), labelled=True)
    _file(os.path.join(tmp_path, 'src', 'x'), np.zeros(4).tobytes())  # Where the name leads.
    _edit_json(os.path.join(src, 'mads', 'manifest.json'),
               lambda m: m['columns']['domain'].__setitem__('file', '../../../x'))
    remote = publish(src)
    cache = _cache(tmp_path, 'work', 'a', 'cache')
    err = _refuse(tmp_path, cache, LabelError,
                  lambda: MADSDataset(remote=remote, local=cache, batch_size=4))
    _refused(err, os.path.join(cache, 'mads', 'manifest.json'), '../../../x')  # And no work/x.


def test_dotdot_tokenizer_file_cannot_overwrite_through_the_training_checks(tmp_path, publish):
    """(5) The record fetch of the checks before training (``mads train``) overwrote an existing
    file outside ``local`` with the remote's ``tokenizer/../../../../x``."""
    victim = _file(os.path.join(tmp_path, 'work', 'x'), b'mine')
    src = _stream(os.path.join(tmp_path, 'src', 'a', 'b', 'ds'))
    _file(os.path.join(tmp_path, 'src', 'x'), b'theirs')  # Where the name leads on the remote.
    _file(os.path.join(src, 'tokenizer', 'tokenizer.json'), b'{}')
    _record(src, {'path': 'tokenizer/tokenizer.json', 'files': ['tokenizer.json', '../../../../x']})
    remote = publish(src)
    cache = _cache(tmp_path, 'work', 'cache')
    err = _refuse(tmp_path, cache, ConvertError, lambda: stream_convert_info(cache, remote))
    _refused(err, 'mads_convert.json', '../../../../x')
    with open(victim, 'rb') as f:
        assert f.read() == b'mine'


@pytest.mark.parametrize('bad', ['abs', '../x.zstd', 'sub/../../x.zstd'])
def test_crafted_index_refused_before_streaming_downloads_a_shard(tmp_path, publish, bad):
    """Streaming downloads, decompresses and evicts shards by their index basenames: the
    dataset refuses an index naming a file outside the cache before any shard is fetched."""
    sentinel = _file(os.path.join(tmp_path, 'work', 'x.zstd'), b'precious')
    name = sentinel if bad == 'abs' else bad
    src = _stream(os.path.join(tmp_path, 'src', 'ds'), labelled=True)
    _set_basename(src, name, shard=1)
    remote = publish(src)
    cache = _cache(tmp_path, 'work', 'cache')
    err = _refuse(tmp_path, cache, UnsafePathError,
                  lambda: MADSDataset(remote=remote, local=cache, batch_size=4))
    assert os.listdir(cache) == ['index.json']  # No shard, no label file.
    _refused(err, os.path.join(cache, 'index.json'), name)


def test_plain_streaming_loader_refuses_a_crafted_index(tmp_path, publish):
    """``name: streaming`` loaders of ``mads train`` (eval sets, the uniform baseline) build a
    plain StreamingDataset, which fetches shards by the index's names: checked there too."""
    sentinel = _file(os.path.join(tmp_path, 'work', 'x.zstd'), b'precious')
    src = _stream(os.path.join(tmp_path, 'src', 'ds'))
    _set_basename(src, '../x.zstd')
    remote = publish(src)
    cache = _cache(tmp_path, 'work', 'cache')
    config = {'name': 'streaming', 'dataset': {'remote': remote, 'local': cache}}
    err = _refuse(tmp_path, cache, UnsafePathError,
                  lambda: build_dataloader(config, None, 4, where='eval_loader'))
    assert os.listdir(cache) == ['index.json']
    _refused(err, os.path.join(cache, 'index.json'), '../x.zstd')
    with open(sentinel, 'rb') as f:
        assert f.read() == b'precious'


def test_stream_path_of_a_record_cannot_leave_the_cache(tmp_path, publish, capsys):
    """A stream ``path`` of ``mads_convert.json`` names where its fresh ``index.json`` goes."""
    victim = os.path.join(tmp_path, 'work', 'victim')
    _file(os.path.join(victim, 'index.json'), b'{}')
    src = _stream(os.path.join(tmp_path, 'src', 'ds'))
    _record(src, {'path': 'tokenizer/tokenizer.json', 'files': ['tokenizer.json']})
    _edit_json(os.path.join(src, 'mads_convert.json'),
               lambda r: r['streams'][0].__setitem__('path', '../victim'))
    remote = publish(src)
    cache = _cache(tmp_path, 'work', 'cache')
    err = _refuse(tmp_path, cache, _Failed, lambda: _label(remote, cache, capsys))
    _refused(err, os.path.join(cache, 'mads_convert.json'), '../victim')


# ----------------------------------------------------------------------------------------------
# Local datasets: a crafted name is refused before the file it names is read.


@pytest.fixture
def local_crafted(tmp_path):
    """A labelled local stream whose index names a sentinel file outside it (absolute)."""
    sentinel = _file(os.path.join(tmp_path, 'outside', 'passwd'), b'root:x:0:0')
    data = _stream(os.path.join(tmp_path, 'data'), labelled=True)
    _set_basename(data, sentinel)
    return data, sentinel


def test_local_index_basename_not_read_by_mads_label(local_crafted, opened, capsys):
    data, sentinel = local_crafted
    rc = main(['label', data, '--columns', 'domain', '--workers', '1', '--no-progress'])
    err = capsys.readouterr().err
    assert rc == 2 and repr(sentinel) in err and 'untrusted' in err, err
    assert sentinel not in opened


def test_local_index_basename_not_read_when_writing_labels(local_crafted, opened):
    data, sentinel = local_crafted
    with pytest.raises(LabelError) as err:
        write_labels(data, {'domain': categorical(np.zeros(40, np.int64), ['web'])})
    _refused(err.value, os.path.join(data, 'index.json'), sentinel)
    assert sentinel not in opened
    with pytest.raises(LabelingError) as err:
        read_index(data, 'data')
    _refused(err.value, os.path.join(data, 'index.json'), sentinel)


def test_local_index_basename_not_read_by_the_dataset(local_crafted, opened):
    data, sentinel = local_crafted
    with pytest.raises(UnsafePathError) as err:
        MADSDataset(local=data, batch_size=4)
    _refused(err.value, os.path.join(data, 'index.json'), sentinel)
    assert sentinel not in opened


@pytest.mark.parametrize('where', ['shard_hashes', 'column file'])
def test_local_manifest_names_not_read(tmp_path, opened, where):
    """A manifest's shard-hash names and column files are checked before they are opened."""
    sentinel = _file(os.path.join(tmp_path, 'outside', 'passwd'), b'root:x:0:0')
    data = _stream(os.path.join(tmp_path, 'data'), labelled=True)
    manifest = os.path.join(data, 'mads', 'manifest.json')
    opened.clear()  # Only what the reader opens.
    if where == 'shard_hashes':
        _edit_json(manifest, lambda m: m.__setitem__(
            'shard_hashes', {'algo': 'xxh3_64', 'shards': {sentinel: '0'}}))
        with pytest.raises(LabelError) as err:
            StreamLabels(data, 40, 'data')
    else:
        _edit_json(manifest, lambda m: m['columns']['domain'].__setitem__('file', sentinel))
        labels = StreamLabels(data, 40, 'data')
        with pytest.raises(LabelError) as err:
            labels.array('domain')
    _refused(err.value, manifest, sentinel)
    assert sentinel not in opened


def test_merging_a_crafted_manifest_is_refused(tmp_path):
    """Merged columns are uploaded beside a remote's index: a crafted old manifest would make
    ``mads label`` upload a file from outside the cache."""
    data = _stream(os.path.join(tmp_path, 'data'), labelled=True)
    manifest = os.path.join(data, 'mads', 'manifest.json')
    _edit_json(manifest, lambda m: m['columns']['topic'].__setitem__('file', '../../secret'))
    with pytest.raises(LabelError) as err:
        write_labels(data, {'domain': categorical(np.zeros(40, np.int64), ['web'])})
    _refused(err.value, manifest, '../../secret')


@pytest.mark.parametrize('field,value', [('path', '/abs/tokenizer.json'),
                                         ('path', '../tokenizer.json'),
                                         ('files', ['a/../../b'])])
def test_local_convert_record_names_refused(tmp_path, field, value):
    data = _stream(os.path.join(tmp_path, 'data'))
    tok = {'path': 'tokenizer/tokenizer.json', 'files': ['tokenizer.json'], field: value}
    _record(data, tok)
    bad = value if isinstance(value, str) else value[0]
    with pytest.raises(ConvertError) as err:
        read_convert_info(data)
    _refused(err.value, os.path.join(data, 'mads_convert.json'), bad)
    with pytest.raises(TokenizerError) as err:  # A record that did not come through the reader.
        tokenizer_from_record({'kind': 'tokenizers', 'path': '../tokenizer.json'}, data)
    _refused(err.value, 'mads_convert.json', '../tokenizer.json')
