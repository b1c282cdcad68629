"""A remote dataset on a local S3-compatible server: the console's probes download nothing extra.

A moto S3 server on 127.0.0.1 (started here) holds the MDS shards and sidecar labels; Streaming
downloads shards into a local cache as its loader needs them. Probes are candidates of pools the
rank's workers already built, so every shard in the cache must be one the loader's own pools
(plus its bounded look-ahead) needed; probes at random positions of the dataset would pull in
shards far outside that set.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest

pytest.importorskip('moto.server')
sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'benchmarks'))
from common import cached_shards, local_s3, upload_dir  # noqa: E402

SHUFFLE = dict(shuffle=True, shuffle_seed=17, shuffle_block_size=40)


@pytest.fixture
def s3():
    """A moto S3 server on a free local port (benchmarks/common.py), bucket ``data``."""
    with local_s3('data') as client:
        yield client


def test_console_updates_download_no_extra_shards(s3, tmp_path):
    from streaming import StreamingDataset
    from test_dataset import batches

    from lm_corpus import make_trainer, write_corpus, write_reference
    data = write_corpus(os.path.join(tmp_path, 'data'), n=2400, size_limit=1 << 11,
                        ids=True)
    ref = write_reference(os.path.join(tmp_path, 'ref'))
    upload_dir(s3, data, 'data', 'corpus')
    cache = os.path.join(tmp_path, 'cache')
    run_batches, pool, predownload = 24, 16, 32
    trainer, algo, ds = make_trainer(
        cache, ref, max_duration=f'{run_batches}ba', num_workers=1,
        console={'update_interval': 6, 'probe_size': 24},
        dataset={'remote': 's3://data/corpus', 'predownload': predownload, **SHUFFLE})
    num_shards = ds.num_shards
    trainer.fit()
    assert algo.console.latest == 4 and algo.console.log_missing == 0
    # The shards the loader alone needs: its pools up to the last batch, plus its look-ahead
    # (1 worker x prefetch 2 batches, and Streaming's predownload of candidates).
    plain = StreamingDataset(local=data, batch_size=pool, **SHUFFLE)
    pools = batches(plain, num_workers=0)
    ahead = run_batches + 2 + predownload // pool + 1
    needed = np.unique([i for p in pools[:ahead] for i in p])
    needed_shards = set(np.searchsorted(plain.sample_offset_per_shard, needed, 'right') - 1)
    cached = cached_shards(cache)
    assert len(needed_shards) < num_shards // 2  # So random probes would hit other shards.
    assert cached <= needed_shards, sorted(cached - needed_shards)
