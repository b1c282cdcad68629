"""Shared fixtures: real MDS shards (zstd, Streaming's MDSWriter) with real sidecar labels."""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import pytest
from streaming import MDSWriter

from streaming_mads.labels import categorical, score, write_labels

DOMAINS = ('books', 'code', 'news', 'web')


def write_stream(out: str, ids: Sequence[int], seq_len: int = 8, size_limit: int = 1 << 12) -> str:
    """MDS shards of samples ``{'id', 'tokens'}`` (tokens derived from the id), zstd-compressed."""
    columns = {'id': 'int', 'tokens': 'ndarray:int32'}
    with MDSWriter(out=out, columns=columns, compression='zstd', size_limit=size_limit) as w:
        for i in ids:
            w.write({'id': int(i), 'tokens': (np.arange(seq_len, dtype=np.int32) + i) % 97})
    return out


def label_arrays(ids: np.ndarray) -> dict:
    """Deterministic labels of global sample ids: domain, quality (0-5) and topic."""
    ids = np.asarray(ids)
    domain = ids % len(DOMAINS)
    quality = ((ids * 7919) % 1000) / 200.0  # Spread over [0, 5).
    topic = (ids // 3) % 3
    return {'domain': domain, 'quality': quality, 'topic': topic}


def write_labelled_stream(out: str, ids: Sequence[int], **kwargs) -> str:
    write_stream(out, ids, **kwargs)
    lab = label_arrays(np.asarray(ids))
    write_labels(out, {
        'domain': categorical(lab['domain'], DOMAINS),
        'quality': score(lab['quality']),
        'topic': categorical(lab['topic'], ('t0', 't1', 't2')),
    })
    return out


@pytest.fixture
def mds_dir(tmp_path) -> str:
    """One labelled stream of 600 samples in several shards."""
    return write_labelled_stream(os.path.join(tmp_path, 'data'), range(600))


_SHM = '/dev/shm'


_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True, scope='session')
def _nothing_written_into_the_checkout():
    """A run folder (``mads train`` writes one where it runs) must go under a test's tmp_path."""
    before = set(os.listdir(_ROOT))
    yield
    new = sorted(n for n in set(os.listdir(_ROOT)) - before
                 if not n.startswith('.') and n != '__pycache__' and not n.endswith('.egg-info'))
    assert not new, f'tests wrote {new} into the checkout; chdir to tmp_path (monkeypatch.chdir)'


@pytest.fixture(autouse=True, scope='session')
def _remove_stale_streaming_lock_files():
    """Remove the lock files Streaming left in the temp folder for prefixes that are gone.

    Streaming never removes them and every StreamingDataset skips each prefix that has one, one
    ``stat`` at a time, so a machine that has run this suite many times builds each dataset in a
    fifth of a second instead of milliseconds (``mads clean-shm`` does the same for users).
    """
    from streaming_mads.shm import CleanShmError, clean_filelocks
    try:
        clean_filelocks()
    except CleanShmError:  # No /proc (not Linux): who holds a lock cannot be told; keep them.
        pass
    yield


@pytest.fixture(autouse=True)
def _release_streaming_shared_memory(tmp_path_factory):
    """Unlink the shared memory Streaming (and the weight board) left behind by this session.

    Every new StreamingDataset looks for a free shared-memory prefix by opening the segments of
    every prefix still present, and keeps those handles open. In one process that builds hundreds
    of datasets (this suite), some kept alive by tracebacks or loaders, the open files then grow
    quadratically until the process runs out. Users build one dataset per process, so this only
    matters here. A prefix is this session's when its registered local directories lie under
    this session's temporary directory, so other processes' datasets are left alone.
    """
    yield
    if not os.path.isdir(_SHM):
        return
    mine = os.path.join(str(tmp_path_factory.getbasetemp()), '').encode()  # Not pytest-12 in -123.
    names = os.listdir(_SHM)
    for name in names:
        if not (name[:6].isdigit() and name.endswith('_locals')):
            continue
        try:
            with open(os.path.join(_SHM, name), 'rb') as f:
                if mine not in f.read():
                    continue
        except OSError:
            continue
        for other in names:
            if other.startswith(name[:7]):
                try:
                    os.unlink(os.path.join(_SHM, other))
                except OSError:
                    pass
