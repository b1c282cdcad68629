"""MADSDataset against real MDS shards, real DataLoader workers and the real weight board."""

from __future__ import annotations

import gc
import os
from typing import Any, Optional

import numpy as np
import pytest
from conftest import DOMAINS, label_arrays, write_labelled_stream, write_stream
from streaming import StreamingDataset
from torch.utils.data import DataLoader

from streaming_mads import MADSDataset
from streaming_mads.selection.scores import centred_log_weights

B = 4


def batches(ds, num_workers: int = 2, limit: Optional[int] = None, **kwargs: Any) -> list[list[int]]:
    """Sample ids of each DataLoader batch."""
    loader = DataLoader(ds, batch_size=ds.device_batch_size if isinstance(ds, MADSDataset) else
                        ds.batch_size, num_workers=num_workers, **kwargs)
    out = []
    for batch in loader:
        out.append(batch['id'].tolist())
        if limit is not None and len(out) >= limit:
            break
    return out


def domain_weights(top: tuple[int, int]) -> np.ndarray:
    """A domain memory ranking ``top[0]`` first, ``top[1]`` second, the rest far below."""
    w = np.full(len(DOMAINS), 1.0)
    w[top[0]], w[top[1]] = 64.0, 16.0
    return w


def version_top(v: int) -> tuple[int, int]:
    """The two preferred domains of version ``v`` (adjacent versions always differ)."""
    return (v % 4, (v + 1) % 4)


def publish_versions(ds: MADSDataset, versions: range) -> None:
    for v in versions:
        ds.publish(v, np.array([1.0]), [domain_weights(version_top(v))])


def domains_of(ids: list[int]) -> set[int]:
    return set(int(d) for d in label_arrays(np.asarray(ids))['domain'])


def test_pool_ratio_one_is_the_parent(mds_dir):
    kwargs = dict(local=mds_dir, shuffle=True, shuffle_seed=7, shuffle_block_size=64,
                  num_canonical_nodes=2)
    plain = StreamingDataset(batch_size=B, **kwargs)
    expected = batches(plain)
    assert len(plain) == sum(map(len, expected))
    del plain
    gc.collect()
    mads = MADSDataset(batch_size=B, pool_ratio=1, **kwargs)
    assert batches(mads) == expected
    assert len(mads) == sum(map(len, expected))


@pytest.mark.parametrize('num_workers', [0, 2])
def test_pool_ratio_one_without_agents_needs_no_labels(tmp_path, num_workers):
    data = write_stream(os.path.join(tmp_path, 'unlabelled'), range(300))
    assert not os.path.exists(os.path.join(data, 'mads'))
    kwargs = dict(local=data, shuffle=True, shuffle_seed=5, shuffle_block_size=128,
                  num_canonical_nodes=2)
    plain = StreamingDataset(batch_size=B, **kwargs)
    expected = batches(plain, num_workers=num_workers)
    del plain
    gc.collect()
    mads = MADSDataset(batch_size=B, pool_ratio=1, agents=[], **kwargs)
    assert mads.agents == [] and len(mads) == 300
    assert batches(mads, num_workers=num_workers) == expected
    from streaming_mads.console import Console, ConsoleConfig
    with pytest.raises(ValueError, match='no agents'):  # Nothing for a console to steer.
        Console(ConsoleConfig(), list, None).attach(mads, depth=0, reference=[{'id': 0}])


def test_hard_topk_keeps_the_best_of_every_pool(mds_dir):
    r = 3
    # The pools are the parent's batches of r*B candidates.
    plain = StreamingDataset(local=mds_dir, batch_size=r * B, shuffle=True, shuffle_seed=3)
    pools = batches(plain, num_workers=1)
    del plain
    gc.collect()
    ds = MADSDataset(local=mds_dir, batch_size=B, pool_ratio=r, temperature=0.0, shuffle=True,
                     shuffle_seed=3, agents=['domain', 'quality'])
    memories = [np.array([1, 3, 9, 27.0]), np.array([0.5, 1, 2, 4, 8.0])]
    theta = np.array([0.3, 0.7])
    ds.publish(0, theta, memories)
    kept = batches(ds, num_workers=1)
    assert len(kept) == len(pools) and len(ds) == sum(map(len, kept))
    # Expected score of any sample, computed from the labels directly.
    qfreq = np.bincount(np.searchsorted([1, 2, 3, 4], label_arrays(np.arange(600))['quality'],
                                        side='right'), minlength=5)
    dfreq = np.bincount(label_arrays(np.arange(600))['domain'], minlength=4)
    dscore = centred_log_weights(memories[0], dfreq)
    qscore = centred_log_weights(memories[1], qfreq)

    def score(i: int) -> float:
        lab = label_arrays(np.array([i]))
        return theta[0] * dscore[lab['domain'][0]] + \
            theta[1] * qscore[np.searchsorted([1, 2, 3, 4], lab['quality'][0], side='right')]

    for pool, keep in zip(pools, kept):
        assert set(keep) <= set(pool) and len(keep) == min(B, len(pool))
        dropped = set(pool) - set(keep)
        if dropped:
            assert min(score(i) for i in keep) >= max(score(i) for i in dropped) - 1e-12


def _inclusion_probabilities(w: np.ndarray) -> np.ndarray:
    """Exact P(candidate kept) when drawing 2 without replacement proportionally to ``w``."""
    total = w.sum()
    p = w / total
    out = p.copy()
    for j in range(len(w)):
        others = np.arange(len(w)) != j
        out[others] += p[j] * w[others] / (total - w[j])
    return out


def test_soft_selection_follows_gumbel_topk_probabilities(tmp_path):
    n, b, r = 4000, 2, 4
    data = write_labelled_stream(os.path.join(tmp_path, 'big'), range(n), seq_len=2,
                                 size_limit=1 << 15)
    tau = 0.8
    memory = np.array([1.0, 2.0, 4.0, 8.0])
    ds = MADSDataset(local=data, batch_size=b, pool_ratio=r, temperature=tau, shuffle=True,
                     agents=['domain'], selection_seed=11)
    ds.publish(0, np.array([1.0]), [memory])
    kept = [i for batch in batches(ds, num_workers=1) for i in batch]
    del ds
    gc.collect()
    plain = StreamingDataset(local=data, batch_size=b * r, shuffle=True)
    pools = batches(plain, num_workers=1)
    # Expected kept count per domain: sum of exact inclusion probabilities over the pools.
    table = np.exp(centred_log_weights(memory, np.bincount(np.arange(n) % 4)) / tau)
    expected = np.zeros(4)
    variance = np.zeros(4)
    for pool in pools:
        doms = label_arrays(np.asarray(pool))['domain']
        probs = _inclusion_probabilities(table[doms])
        np.add.at(expected, doms, probs)
        np.add.at(variance, doms, probs * (1 - probs))
    observed = np.bincount(label_arrays(np.asarray(kept))['domain'], minlength=4)
    assert observed.sum() == round(expected.sum())
    # Tolerance: 4 standard deviations of the per-domain count (Bernoulli variance bound).
    assert np.all(np.abs(observed - expected) <= 4 * np.sqrt(variance) + 1), (observed, expected)
    # And the selection is far from uniform, so the test would catch ignored weights.
    assert observed[3] > 2 * observed[0]


def test_versions_apply_from_their_first_batch(mds_dir):
    interval, lead = 6, 5  # lead > num_workers (2) x prefetch_factor (2)
    ds = MADSDataset(local=mds_dir, batch_size=B, pool_ratio=2, temperature=0.0,
                     agents=['domain'], version_timeout=60)  # Unshuffled: 2 per domain a pool.
    ds.configure_schedule(interval, lead)
    publish_versions(ds, range(1))
    loader = DataLoader(ds, batch_size=B, num_workers=2, prefetch_factor=2)
    published = 0
    seen = 0
    for b, batch in enumerate(loader):
        v = b // interval
        assert domains_of(batch['id'].tolist()) == set(version_top(v)), (b, v)
        seen += 1
        # The console's rule: version v is published once v*W - L batches are done.
        if b + 1 == (published + 1) * interval - lead:
            published += 1
            publish_versions(ds, range(published, published + 1))
    assert seen == len(ds) // B and published >= 3


def test_unpublished_version_waits_then_fails_naming_lead(mds_dir):
    ds = MADSDataset(local=mds_dir, batch_size=B, pool_ratio=2, agents=['domain'],
                     version_timeout=1.0)
    ds.configure_schedule(update_interval=3, lead=5)
    with pytest.raises(Exception, match='lead') as info:
        batches(ds, num_workers=2)
    assert 'weight version 1' in str(info.value)


def _selecting(data: str, versions: int = 40, **kwargs: Any) -> MADSDataset:
    """A soft-selecting dataset with ``versions`` random weight versions published."""
    ds = MADSDataset(local=data, batch_size=B, pool_ratio=3, temperature=0.5, shuffle=True,
                     agents=['domain', 'quality'], board_capacity=64, **kwargs)
    ds.configure_schedule(update_interval=5, lead=5)
    for v in range(versions):
        rng = np.random.default_rng(v)
        ds.publish(v, rng.dirichlet([1, 1]), [rng.uniform(0.1, 5, 4), rng.uniform(0.1, 5, 5)])
    return ds


def _run(data: str, num_workers: int) -> list[list[int]]:
    ds = _selecting(data)
    out = batches(ds, num_workers=num_workers)
    del ds
    gc.collect()
    return out


def test_same_config_same_sequence_any_worker_count(mds_dir):
    first = _run(mds_dir, 2)
    assert _run(mds_dir, 2) == first
    assert _run(mds_dir, 1) == first
    assert _run(mds_dir, 0) == first
    assert len({i for b in first for i in b}) == sum(map(len, first))


@pytest.mark.parametrize('k', [6, 13])
def test_resume_mid_window_continues_exactly(mds_dir, k):
    full = _run(mds_dir, 2)
    ds = _selecting(mds_dir)
    head = batches(ds, num_workers=2, limit=k)
    state = ds.state_dict(num_samples=k * B, from_beginning=False)
    del ds
    gc.collect()
    ds = _selecting(mds_dir)
    ds.load_state_dict(state)
    tail = batches(ds, num_workers=2)
    assert head + tail == full


def test_state_from_another_pool_shape_is_refused(mds_dir):
    ds = MADSDataset(local=mds_dir, batch_size=B, pool_ratio=2, agents=['domain'])
    state = ds.state_dict(num_samples=8, from_beginning=False)
    assert state['sample_in_epoch'] == 16  # 8 yielded samples = 16 candidates.
    del ds
    gc.collect()
    ds = MADSDataset(local=mds_dir, batch_size=B, pool_ratio=3, agents=['domain'])
    with pytest.raises(ValueError, match='pool_ratio'):
        ds.load_state_dict(state)


def test_spawned_persistent_workers_follow_versions_across_epochs(mds_dir):
    interval = 4
    ds = MADSDataset(local=mds_dir, batch_size=B, pool_ratio=2, temperature=0.0,
                     agents=['domain'], board_capacity=128)
    ds.configure_schedule(interval, lead=5)
    per_epoch = ds.batches_per_epoch
    publish_versions(ds, range((2 * per_epoch) // interval + 1))
    loader = DataLoader(ds, batch_size=B, num_workers=2, persistent_workers=True,
                        multiprocessing_context='spawn')
    b = 0
    for _ in range(2):
        for batch in loader:
            assert domains_of(batch['id'].tolist()) == set(version_top(b // interval)), b
            b += 1
    assert b == 2 * per_epoch


@pytest.mark.parametrize('drop_last', [True, False])
def test_versions_follow_the_trainers_batches_over_epochs(tmp_path, drop_last):
    # 603 samples: 75 full pools of 8 and a last pool of 3 candidates, a partial batch (3 < B)
    # that drop_last drops. Global batch numbers must follow the batches the DataLoader yields.
    data = write_labelled_stream(os.path.join(tmp_path, 'odd'), range(603))
    interval, lead = 6, 5
    ds = MADSDataset(local=data, batch_size=B, pool_ratio=2, temperature=0.0, agents=['domain'],
                     version_timeout=30)
    assert ds.batches_per_epoch == 76
    per_epoch = ds.trainer_batches_per_epoch(drop_last)
    assert per_epoch == (75 if drop_last else 76)
    ds.configure_schedule(interval, lead, per_epoch)
    publish_versions(ds, range(1))
    loader = DataLoader(ds, batch_size=B, num_workers=2, prefetch_factor=2, drop_last=drop_last)
    g = published = 0
    for _ in range(3):
        seen = 0
        for batch in loader:
            ids = batch['id'].tolist()
            if len(ids) == B:  # The partial batch keeps all of its 3 candidates.
                assert domains_of(ids) == set(version_top(g // interval)), (g, drop_last)
            g += 1
            seen += 1
            if g == (published + 1) * interval - lead:
                published += 1
                publish_versions(ds, range(published, published + 1))
        assert seen == per_epoch
    assert g == 3 * per_epoch


def test_trainer_batches_per_epoch_is_bounded(mds_dir):
    ds = MADSDataset(local=mds_dir, batch_size=B, pool_ratio=2, agents=['domain'])
    with pytest.raises(ValueError, match='batches_per_epoch=76 must be between 1 and the 75'):
        ds.configure_schedule(6, 5, 76)
