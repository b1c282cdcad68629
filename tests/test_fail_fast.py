"""A DataLoader used the wrong way fails within seconds with what to do, never waits
``version_timeout`` (600 s by default): a DataLoader whose batch size is not the dataset's, a
DataLoader iterated after its run's fit. A batch taken before ``Trainer.fit`` (a common sanity
check) changes nothing at all.

The runs below set ``version_timeout=30`` only so that a regression fails in 30 s instead of
hanging; the checks assert the errors come well before it, so none depends on the timeout.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest
import torch
from lm_corpus import make_trainer
from test_console import BatchRecorder, corpus  # noqa: F401 (corpus: the fixture)

from streaming_mads.selection.board import (VersionTimeoutError, VersionUnreachableError,
                                            WeightBoard)

TIMEOUT = {'version_timeout': 30}


@pytest.mark.parametrize('num_workers', [0, 2])
def test_batch_before_fit_changes_nothing_and_iterating_after_fit_fails_fast(corpus, num_workers):
    data, ref = corpus
    plain = BatchRecorder()
    trainer, _, _ = make_trainer(data, ref, max_duration='8ba', num_workers=num_workers,
                                 callbacks=[plain], dataset=TIMEOUT)
    trainer.fit()
    peeked = BatchRecorder()
    trainer, _, _ = make_trainer(data, ref, max_duration='8ba', num_workers=num_workers,
                                 callbacks=[peeked], dataset=TIMEOUT)
    loader = trainer.state.train_dataloader
    # The sanity check itself works. (fork_rng: torch's DataLoader draws its worker seed from
    # the global RNG, which the model's dropout then misses; that is torch's, not the data's.)
    with torch.random.fork_rng():
        assert next(iter(loader))['input_ids'].shape == (8, 16)
    start = time.monotonic()
    trainer.fit()
    assert time.monotonic() - start < 25
    assert sorted(peeked.batches) == sorted(plain.batches) == list(range(8))
    for b, expected in plain.batches.items():
        assert torch.equal(peeked.batches[b], expected), b  # The same run as without the peek.
    # After fit nothing publishes: the next epoch needs versions that will never come.
    start = time.monotonic()
    with pytest.raises(VersionUnreachableError, match='no console is running'):
        for _ in loader:
            pass
    assert time.monotonic() - start < 10


@pytest.mark.parametrize('num_workers', [0, 2])
@pytest.mark.parametrize('loader_batch', [4, 16])
def test_dataloader_batch_size_other_than_the_datasets_fails_at_fit_start(corpus, num_workers,
                                                                          loader_batch):
    data, ref = corpus
    trainer, _, _ = make_trainer(data, ref, num_workers=num_workers, dataset=TIMEOUT,
                                 loader={'batch_size': loader_batch})
    start = time.monotonic()
    with pytest.raises(ValueError, match=f'DataLoader has batch_size={loader_batch} but its '
                                         f'MADSDataset has batch_size=8.*batch_size=8'):
        trainer.fit()
    assert time.monotonic() - start < 10
    assert int(trainer.state.timestamp.batch) == 0


def test_a_version_that_cannot_come_fails_at_once():
    board = WeightBoard(f'mads_test_reach_{os.getpid()}', [3], 4, create=True)
    try:
        board.publish(0, [1.0], [np.ones(3)])
        board.configure(update_interval=4, lead=2)
        with pytest.raises(VersionTimeoutError, match='lead 2'):  # The next one: waited for.
            board.wait_for(1, timeout=0.05)
        start = time.monotonic()
        with pytest.raises(VersionUnreachableError, match='version 2 for global batch 9.*newest '
                                                          'published is 0'):
            board.wait_for(2, timeout=30, batch=9)
        board.publish(1, [1.0], [np.ones(3)])
        board.detach()  # The console's fit ended.
        assert board.wait_for(1, timeout=30).version == 1  # Published versions still serve.
        with pytest.raises(VersionUnreachableError, match='no console is running'):
            board.wait_for(2, timeout=30)
        assert time.monotonic() - start < 1
    finally:
        board.cleanup()
