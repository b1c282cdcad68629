"""The Streaming internals MADSDataset relies on are all there, or the error names the fix."""

from __future__ import annotations

import pytest

from streaming_mads import MADSDataset
from streaming_mads.streaming_internals import (SUPPORTED, StreamingInternalsError,
                                                check_streaming, streaming_version)


def test_installed_streaming_has_every_internal_used(mds_dir):
    check_streaming()
    ds = MADSDataset(local=mds_dir, batch_size=4, pool_ratio=2, agents=['domain'])
    check_streaming(ds)
    assert streaming_version().startswith(('0.12.', '0.13.'))


def test_missing_internal_names_the_supported_releases(mds_dir):
    ds = MADSDataset(local=mds_dir, batch_size=4, pool_ratio=2, agents=['domain'])
    del ds.sample_offset_per_shard  # As a Streaming release without that field would be.
    with pytest.raises(StreamingInternalsError, match='sample_offset_per_shard') as info:
        check_streaming(ds)
    assert SUPPORTED in str(info.value) and streaming_version() in str(info.value)


def test_reading_samples_in_the_main_process_keeps_the_dataset_picklable(mds_dir):
    """The tokenizer check reads a dataset's first samples before training; spawned DataLoader
    workers must still receive the dataset (Streaming's cache lock cannot be pickled)."""
    import pickle

    from streaming_mads import MADSDataset
    from streaming_mads.streaming_internals import read_samples
    ds = MADSDataset(local=mds_dir, batch_size=4, pool_ratio=2, shuffle=False)
    first = read_samples(ds, [0, 1, 2])
    assert [int(s['id']) for s in first] == [0, 1, 2]
    copy = pickle.loads(pickle.dumps(ds))
    assert int(copy[5]['id']) == 5
