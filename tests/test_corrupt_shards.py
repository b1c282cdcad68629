"""Damaged shards: a read or decompression failure is an error naming the shard, never an early
end of the epoch or a hang; ``verify_shards`` and ``mads verify`` refuse modified local shards.

The corrupt-shard runs repeat (the failure depends on which thread meets the shard first) and
each runs under a deadline, so a hang fails the test instead of blocking the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
from contextlib import contextmanager
from typing import Iterator, Optional

import numpy as np
import pytest
from conftest import write_labelled_stream
from streaming.base.compression import decompress
from torch.utils.data import DataLoader

from streaming_mads import MADSDataset
from streaming_mads.run.cli import main
from streaming_mads.shard_check import ShardCheckError, verify_streams
from streaming_mads.streaming_internals import ShardReadError

B = 8
SAMPLES = 240  # Four shards of about 77 samples.
BAD = 1  # The damaged shard.
REPEATS = 8
DEADLINE = 20.0  # Seconds for one epoch of a few hundred samples (a good one takes well under 1).


class _Hung(Exception):
    """The iteration neither ended nor raised before the deadline."""


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    def expire(signum, frame):
        raise _Hung(f'no error and no end of the epoch after {seconds} s')

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def _dataset(**kwargs) -> MADSDataset:
    """``MADSDataset(**kwargs)``, tried again if Streaming's shared-memory prefix was taken under
    it: its registration races with other processes building datasets at the same moment (other
    test runs on this machine), a ``FileExistsError`` on ``<prefix>_locals`` that has nothing to
    do with the shards. These tests build some seventy datasets."""
    for _ in range(2):
        try:
            return MADSDataset(**kwargs)
        except FileExistsError:
            pass
    return MADSDataset(**kwargs)


def _index(split_dir: str) -> dict:
    with open(os.path.join(split_dir, 'index.json'), encoding='utf-8') as f:
        return json.load(f)


def _hashed_stream(out: str, compression: Optional[str] = None, hashes=('xxh3_64',)) -> str:
    """A labelled stream whose index records each shard file's hash (as `mads convert` does)."""
    from streaming import MDSWriter

    from streaming_mads.labels import categorical, write_labels
    columns = {'id': 'int', 'tokens': 'ndarray:int32'}
    with MDSWriter(out=out, columns=columns, compression=compression, hashes=list(hashes) or None,
                   size_limit=1 << 12) as writer:
        for i in range(SAMPLES):
            writer.write({'id': i, 'tokens': np.arange(8, dtype=np.int32) + i})
    write_labels(out, {'domain': categorical(np.arange(SAMPLES) % 4, ('a', 'b', 'c', 'd'))})
    return out


def _truncate(path: str) -> None:
    with open(path, 'rb') as f:
        data = f.read()
    with open(path, 'wb') as f:
        f.write(data[:len(data) // 2])


def _flip_failing(path: str, compression: str) -> None:
    """Flip one byte past the middle of a compressed shard where decompression then fails (a
    flip that still decompresses is for the hashes: :func:`test_verify_shards_refuses_a_cached_
    zstd_shard_that_still_decompresses`)."""
    with open(path, 'rb') as f:
        data = f.read()
    for pos in range(len(data) // 2, len(data)):
        flipped = bytearray(data)
        flipped[pos] ^= 0x10
        try:
            decompress(compression, bytes(flipped))
        except Exception:
            with open(path, 'wb') as f:
                f.write(bytes(flipped))
            return
    raise AssertionError('no byte flip breaks decompression')


@pytest.fixture(scope='module')
def remote(tmp_path_factory) -> str:
    """A labelled zstd stream (Streaming's MDSWriter) standing for a remote."""
    return write_labelled_stream(str(tmp_path_factory.mktemp('remote') / 'data'), range(SAMPLES))


def _local_copy(remote: str, local: str) -> str:
    """A local cache holding the remote's index and compressed shards, as Streaming leaves it
    after downloading them (the labels are fetched by the dataset)."""
    os.makedirs(local)
    for name in os.listdir(remote):
        if os.path.isfile(os.path.join(remote, name)):
            shutil.copy(os.path.join(remote, name), os.path.join(local, name))
    return local


def _epoch(ds: MADSDataset, num_workers: int) -> list[int]:
    """One epoch's sample ids, under the deadline (the threads are released if it hangs)."""
    ids: list[int] = []
    batches = iter(DataLoader(ds, batch_size=B, num_workers=num_workers))
    try:
        with _deadline(DEADLINE):
            for batch in batches:
                ids.extend(batch['id'].tolist())
    except _Hung:
        event, it = getattr(ds, '_event', None), getattr(ds, '_iterator', None)
        if event is not None:
            event.set()
        if it is not None:
            it.non_blocking_exit()
        raise
    finally:
        # Stop the workers now: left to the garbage collector (a traceback keeps the iterator),
        # the DataLoader waits 5 s for each before killing it.
        shutdown = getattr(batches, '_shutdown_workers', None)
        if shutdown is not None:
            shutdown()
    return ids


def _expect_named_error(ds: MADSDataset, num_workers: int, basename: str, stream: str) -> None:
    try:
        ids = _epoch(ds, num_workers)
    except _Hung as err:
        pytest.fail(f'hung: {err}')
    except Exception as err:  # Through DataLoader workers the type is kept, the message too.
        assert isinstance(err, ShardReadError), repr(err)
        assert basename in str(err) and stream in str(err), str(err)
        return
    pytest.fail(f'the epoch ended after {len(ids)} samples without an error')


@pytest.mark.parametrize('damage', ['truncated', 'flipped'])
@pytest.mark.parametrize('pool_ratio', [1, 2])
@pytest.mark.parametrize('num_workers', [0, 2])
def test_corrupt_compressed_shard_is_an_error_naming_it(tmp_path, remote, damage, pool_ratio,
                                                        num_workers):
    zip_name = _index(remote)['shards'][BAD]['zip_data']['basename']
    for rep in range(REPEATS):
        local = _local_copy(remote, str(tmp_path / f'local{rep}'))
        if damage == 'truncated':
            _truncate(os.path.join(local, zip_name))
        else:
            _flip_failing(os.path.join(local, zip_name), 'zstd')
        ds = _dataset(remote=remote, local=local, batch_size=B, pool_ratio=pool_ratio,
                      agents=['domain'], shuffle=rep % 2 == 1, shuffle_seed=rep)
        _expect_named_error(ds, num_workers, zip_name, remote)
        del ds


@pytest.mark.parametrize('pool_ratio', [1, 2])
@pytest.mark.parametrize('num_workers', [0, 2])
def test_truncated_local_raw_shard_is_an_error_naming_it(tmp_path, pool_ratio, num_workers):
    data = _hashed_stream(str(tmp_path / 'raw'), hashes=())  # Raw shards, only in `local`.
    raw_name = _index(data)['shards'][BAD]['raw_data']['basename']
    _truncate(os.path.join(data, raw_name))
    for rep in range(2):
        ds = _dataset(local=data, batch_size=B, pool_ratio=pool_ratio, agents=['domain'],
                      shuffle=rep == 1)
        _expect_named_error(ds, num_workers, raw_name, data)
        del ds


def test_clean_dataset_reads_every_sample(tmp_path, remote):
    """The control: the same setup without damage yields every candidate's pick, no error."""
    ds = MADSDataset(remote=remote, local=_local_copy(remote, str(tmp_path / 'local')),
                     batch_size=B, pool_ratio=2, agents=['domain'])
    assert len(_epoch(ds, 2)) == len(ds)


# -- verify_shards and mads verify ---------------------------------------------------------------


def _flip(path: str, pos: int = -3) -> None:
    """Flip one bit of one byte (by default inside the last sample's tokens)."""
    with open(path, 'r+b') as f:
        data = bytearray(f.read())
        data[pos] ^= 0x01
        f.seek(0)
        f.write(bytes(data))


def _shard_file(split_dir: str, key: str = 'raw_data', shard: int = BAD) -> str:
    return _index(split_dir)['shards'][shard][key]['basename']


def test_flipped_byte_in_a_local_raw_shard_is_refused_by_verify_shards(tmp_path):
    data = _hashed_stream(str(tmp_path / 'data'))
    clean = MADSDataset(local=data, batch_size=B, agents=['domain'], verify_shards=True)
    assert sorted(_epoch(clean, 0)) == list(range(SAMPLES))
    del clean
    name = _shard_file(data)
    _flip(os.path.join(data, name))
    with pytest.raises(ShardCheckError) as info:
        MADSDataset(local=data, batch_size=B, agents=['domain'], verify_shards=True,
                    validate_hash='xxh3_64')
    message = str(info.value)
    assert f'stream {data}: {name}: does not match the xxh3_64 hash' in message, message
    assert message.count('.mds:') == 1  # Only the modified shard.


def test_verify_shards_refuses_a_cached_zstd_shard_that_still_decompresses(tmp_path):
    """A flipped byte that zstd decompresses without complaint (most do: the frames carry no
    checksum) would be trained on; the index's hash of the compressed file refuses it."""
    remote = _hashed_stream(str(tmp_path / 'remote'), compression='zstd')
    local = _local_copy(remote, str(tmp_path / 'local'))
    name = _shard_file(remote, 'zip_data')
    with open(os.path.join(local, name), 'rb') as f:
        stored = f.read()
    for pos in range(len(stored) // 2, len(stored)):
        flipped = bytearray(stored)
        flipped[pos] ^= 0x01
        try:
            decompress('zstd', bytes(flipped))
        except Exception:
            continue
        break
    with open(os.path.join(local, name), 'wb') as f:
        f.write(bytes(flipped))
    with pytest.raises(ShardCheckError, match=f'stream {remote}: {name}: does not match'):
        MADSDataset(remote=remote, local=local, batch_size=B, agents=['domain'],
                    verify_shards=True)


def test_verify_shards_splits_the_files_over_the_nodes_ranks(tmp_path):
    data = _hashed_stream(str(tmp_path / 'data'))
    for shard in range(len(_index(data)['shards'])):
        _flip(os.path.join(data, _shard_file(data, shard=shard)))
    whole = verify_streams([('s', data)])
    parts = [verify_streams([('s', data)], (k, 3)) for k in range(3)]
    assert whole.files == len(whole.bad) == sum(p.files for p in parts) >= 3
    assert sorted(p.basename for part in parts for p in part.bad) == \
        sorted(p.basename for p in whole.bad)


def test_verify_shards_says_when_the_index_has_no_hashes(tmp_path, capsys):
    data = _hashed_stream(str(tmp_path / 'data'), hashes=())
    with pytest.raises(ShardCheckError, match='no hash in their index.json'):
        MADSDataset(local=data, batch_size=B, agents=['domain'], verify_shards=True)
    assert main(['verify', data]) == 2
    assert 'have no hash in their index.json' in capsys.readouterr().err


def test_verify_shards_from_the_yaml_names_the_shard(tmp_path):
    from streaming_mads.run.loader import build_dataloader
    from streaming_mads.run.train import ConfigError
    data = _hashed_stream(str(tmp_path / 'data'))
    name = _shard_file(data)
    _flip(os.path.join(data, name))
    with pytest.raises(ConfigError, match=f'{name}: does not match'):
        build_dataloader({'name': 'mads', 'dataset': {'local': data, 'agents': ['domain'],
                                                      'verify_shards': True}}, None, B)


@pytest.fixture
def converted(tmp_path) -> str:
    """A two-stream `mads convert` output (zstd shards, xxh3_64 hashes in each index)."""
    from streaming_mads.convert.convert import convert
    words = 'the data model loader stream shard agent weight sample token batch epoch'.split()
    for domain in ('web', 'code'):
        os.makedirs(tmp_path / domain)
        for i in range(6):
            text = ' '.join(words[(i * j) % len(words)] for j in range(400))
            (tmp_path / domain / f'{i}.txt').write_text(f'{domain} {text}')
    out = str(tmp_path / 'mds')
    convert([str(tmp_path / 'web'), str(tmp_path / 'code')], out, seq_len=64, size_limit=1 << 12,
            progress=False)
    return out


def test_mads_verify_lists_each_bad_shard_by_stream(converted, capsys):
    assert main(['verify', converted]) == 0
    assert 'every local shard file matches' in capsys.readouterr().out
    stream = os.path.join(converted, 'code')
    name = _shard_file(stream, 'zip_data', shard=1)
    _flip(os.path.join(stream, name), pos=len(open(os.path.join(stream, name), 'rb').read()) // 2)
    raw = _shard_file(stream, 'raw_data', shard=0)
    shutil.copy(os.path.join(stream, _shard_file(stream, 'zip_data', shard=0)),
                os.path.join(stream, raw))  # A local raw file that is not the raw shard.
    assert main(['verify', converted]) == 1
    out = capsys.readouterr()
    assert f'stream code: {name}: does not match the xxh3_64 hash' in out.out, out.out
    assert f'stream code: {raw}: has ' in out.out, out.out
    assert 'stream web' not in out.out and '2 shard file(s) are not' in out.err
