"""Probes at the sizes users run: what the loader reads, over every stream, for any dataset size.

The console draws each update's probes from candidates its rank's DataLoader workers logged on
the weight board while building the pools of the batches done since the last update. These tests
run the real loader (MDS shards, 2 worker processes) over a million samples in three streams of
unequal sizes and proportions, and check the probes against what the loader samples.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from streaming import MDSWriter, Stream
from torch.utils.data import DataLoader

from streaming_mads import MADSDataset, categorical, score, write_labels
from streaming_mads.selection.board import WeightBoard
from streaming_mads.console import Console, ConsoleConfig
from streaming_mads.console.rewards import inclusion_probabilities
from streaming_mads.selection.pools import log_positions

SIZES = (600_000, 300_000, 100_000)  # Unequal streams, written one after another.
PROPORTIONS = (0.2, 0.3, 0.5)  # The smallest stream is upsampled 5x (Streaming repeats it).
EPOCH = 400_000


def _write(root: str, offset: int, n: int) -> str:
    """``n`` samples ``{'id'}`` with a stream-independent quality label, zstd MDS."""
    with MDSWriter(out=root, columns={'id': 'int'}, compression='zstd', size_limit=1 << 15) as w:
        for i in range(offset, offset + n):
            w.write({'id': i})
    ids = np.arange(offset, offset + n)
    write_labels(root, {'quality': score(((ids * 7919) % 1000) / 200.0),
                        'parity': categorical(ids % 2, ['even', 'odd'])})
    return root


@pytest.fixture(scope='module')
def million(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp('million')
    offsets = np.cumsum((0,) + SIZES[:-1])
    return [_write(os.path.join(root, f's{k}'), int(o), n)
            for k, (o, n) in enumerate(zip(offsets, SIZES))]


def test_probes_follow_the_loader_over_streams_and_ids(million):
    streams = [Stream(local=d, proportion=p) for d, p in zip(million, PROPORTIONS)]
    ds = MADSDataset(streams=streams, epoch_size=EPOCH, batch_size=32, pool_ratio=8,
                     shuffle=True, shuffle_seed=3, agents=['quality'], temperature=1.0)
    assert ds.num_samples == sum(SIZES)
    console = Console(ConsoleConfig(update_interval=8, lead=5, probe_size=16, probe_pool=256),
                      make_batch=list, loss_fn=None)  # type: ignore[arg-type]
    console.attach(ds, depth=4, reference=[{'id': 0}])
    loader = DataLoader(ds, batch_size=32, num_workers=2, prefetch_factor=2)
    probes, versions, done, epochs = [], 0, 0, 0
    while versions < 200:  # An epoch holds 195 versions: this crosses into the second.
        epochs += 1
        for _ in loader:
            done += 1
            while (v := console.due(done)) is not None:
                ids, owners = console.draw_probe(v)
                assert len(ids) == 16 and np.all(owners == 0)
                # The regression's weights are the draw's own design, probe by probe.
                if v % 50 == 1:
                    window = console._window
                    sizes = [a.num_values for a in ds.agents]
                    pi = inclusion_probabilities(ds.label_ids(window), sizes, 16)
                    where = {int(i): k for k, i in enumerate(window)}
                    np.testing.assert_allclose(console.probe_weights(ids),
                                               1.0 / pi[[where[int(i)] for i in ids]], rtol=1e-9)
                    with pytest.raises(RuntimeError, match='last draw_probe'):
                        console.probe_weights(ids[:-1])
                probes.append(ids)
                console.publish(v)
                versions += 1
            if versions >= 200:
                break
    assert epochs == 2 and console.log_missing == 0
    probes = np.concatenate(probes)
    # What the loader samples per epoch: Streaming's per-stream `choose` (proportion x epoch).
    choose = np.array([s.choose for s in ds.streams], np.float64)
    offsets = np.asarray(ds.sample_offset_per_stream)
    observed = np.bincount(np.searchsorted(offsets, probes, side='right') - 1, minlength=3)
    expected = choose / choose.sum() * len(probes)
    stat = float(((observed - expected)**2 / expected).sum())
    assert np.exp(-stat / 2) > 0.001, (observed, expected)  # Chi-square p-value, 2 dof.
    # The ids cover every decile of the dataset, the last stream's included.
    deciles = np.bincount(probes * 10 // sum(SIZES), minlength=10)
    assert np.all(deciles > 0), deciles
    # The probes are candidates the loader's workers really built, not ids drawn elsewhere.
    assert len(np.unique(probes)) > 0.95 * len(probes)


def test_probe_log_needs_no_dataset_sized_memory(million):
    ds = MADSDataset(streams=[Stream(local=d) for d in million], batch_size=8, pool_ratio=4,
                     agents=['quality'])
    ds.configure_schedule(update_interval=150, lead=5)
    # The board (weights, counters, probe log) is fixed-size: independent of the sample count.
    small = WeightBoard('mads_test_small_board', [a.num_values for a in ds.agents], create=True)
    try:
        assert ds.board._size == small._size < 1 << 20
    finally:
        small.cleanup()


def test_log_positions_are_a_uniform_prefix_and_skip_padding():
    valid = np.ones(64, bool)
    valid[50:] = False
    counts = np.zeros(64)
    for pool in range(4000):
        pos = log_positions((1, 0, pool), valid, 8)
        assert len(pos) == 8 and np.all(valid[pos]) and len(set(pos.tolist())) == 8
        counts[pos[:2]] += 1  # A prefix is a uniform subset too.
    assert counts[50:].sum() == 0
    share = counts[:50] / counts.sum()
    assert np.all(np.abs(share - 1 / 50) < 0.006), share
    assert len(log_positions((1, 0, 0), valid, 100)) == 50


def test_board_probe_log_stride_and_eviction():
    board = WeightBoard('mads_test_log_board', [3], create=True, log_slots=8, log_width=4)
    try:
        assert board.log_stride == 0 and board.read_log(0) is None  # No console: no log.
        board.configure(update_interval=10, lead=2)
        assert board.log_stride == 3  # Two windows of 10 batches fit on 8 slots.
        assert list(board.logged_batches(4, 13)) == [6, 9, 12]
        board.write_log(7, np.arange(5))  # Off the stride: not logged.
        assert board.read_log(7) is None
        board.write_log(6, np.arange(100, 106))
        assert board.read_log(6).tolist() == [100, 101, 102, 103]  # The first log_width.
        board.write_log(6 + 3 * 8, np.arange(2))  # Same slot, 8 strides later.
        assert board.read_log(6) is None and board.read_log(30).tolist() == [0, 1]
    finally:
        board.cleanup()
