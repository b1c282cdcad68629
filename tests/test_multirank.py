"""Two ranks as two real processes with the distributed environment (as Streaming's tests do)."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import socket
import sys

import numpy as np
import pytest
from conftest import label_arrays

B, R, INTERVAL = 4, 3, 5
MEMORIES = {v: np.random.default_rng(v).uniform(0.1, 9.0, 4) for v in range(64)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _rank_main(rank: int, port: int, data: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE='2',
                      MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    sys.path.insert(0, os.path.dirname(__file__))
    from streaming import StreamingDataset
    from test_dataset import batches

    from streaming_mads import MADSDataset
    kwargs = dict(local=data, shuffle=True, shuffle_seed=5, num_canonical_nodes=1)
    plain = StreamingDataset(batch_size=R * B, **kwargs)
    pools = batches(plain, num_workers=0)  # Same order as with workers (Streaming).
    del plain
    ds = MADSDataset(batch_size=B, pool_ratio=R, temperature=0.0, agents=['domain'],
                     board_capacity=64, **kwargs)
    ds.configure_schedule(update_interval=INTERVAL, lead=5)
    for v, memory in MEMORIES.items():
        ds.publish(v, np.array([1.0]), [memory])
    kept = batches(ds, num_workers=2)
    with open(out, 'w') as f:
        json.dump({'pools': pools, 'kept': kept,
                   'weights': [ds.weights(v).memories[0].tolist() for v in range(4)]}, f)


def test_two_ranks_disjoint_and_same_weights(mds_dir, tmp_path):
    port = _free_port()
    ctx = mp.get_context('spawn')
    outs = [os.path.join(tmp_path, f'rank{r}.json') for r in range(2)]
    procs = [ctx.Process(target=_rank_main, args=(r, port, mds_dir, outs[r])) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=240)
        assert p.exitcode == 0
    results = [json.load(open(o)) for o in outs]
    ids = [[i for b in res['kept'] for i in b] for res in results]
    assert not set(ids[0]) & set(ids[1])  # No sample on both ranks within the epoch.
    assert len(ids[0]) == len(ids[1]) > 0
    assert results[0]['weights'] == results[1]['weights']
    # Every batch of both ranks is the hard top-B of its pool under that batch's version.
    for res in results:
        assert len(res['pools']) == len(res['kept'])
        for b, (pool, keep) in enumerate(zip(res['pools'], res['kept'])):
            memory = MEMORIES[b // INTERVAL]
            score = {i: memory[d] for i, d in zip(pool, label_arrays(np.asarray(pool))['domain'])}
            dropped = set(pool) - set(keep)
            assert set(keep) <= set(pool) and len(keep) == min(B, len(pool))
            if dropped:
                assert min(score[i] for i in keep) >= max(score[i] for i in dropped)


def _console_rank_main(rank: int, port: int, data: str, ref: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE='2', LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE='2',
                      NODE_RANK='0', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(port))
    sys.path.insert(0, os.path.dirname(__file__))
    from composer.loggers import InMemoryLogger
    from lm_corpus import make_trainer

    mem = InMemoryLogger()
    trainer, algo, _ = make_trainer(data, ref, max_duration='20ba', num_workers=1, loggers=[mem])
    trainer.fit()
    state = algo.console.state_dict()
    metrics = {k: [v for _, v in series] for k, series in mem.data.items() if k.startswith('mads/')
               and not k.startswith('mads/update_time') and not k.startswith('mads/selected')}
    with open(out, 'w') as f:
        json.dump({'metrics': metrics, 'theta': state['theta'], 'agents': state['agents'],
                   'versions': state['versions']}, f)


def test_two_ranks_gloo_console_weights_identical(tmp_path):
    from lm_corpus import write_corpus, write_reference
    data = write_corpus(os.path.join(tmp_path, 'data'))
    ref = write_reference(os.path.join(tmp_path, 'ref'))
    port = _free_port()
    ctx = mp.get_context('spawn')
    outs = [os.path.join(tmp_path, f'rank{r}.json') for r in range(2)]
    procs = [ctx.Process(target=_console_rank_main, args=(r, port, data, ref, outs[r]))
             for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0
    a, b = (json.load(open(o)) for o in outs)
    # Every logged weight of every update, and the final state, bit-identical across ranks.
    assert a['metrics'] == b['metrics'] and len(a['metrics']['mads/theta/domain']) == 3
    assert a['theta'] == b['theta'] and a['agents'] == b['agents'] and a['versions'] == b['versions']
    assert a['agents'][1]['memory'] != [1.0, 1.0, 1.0]  # The updates did move the weights.


def _spawn(target, world: int, args: tuple, timeout: float = 300) -> None:
    port = _free_port()
    ctx = mp.get_context('spawn')
    procs = [ctx.Process(target=target, args=(r, world, port) + args) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
        assert p.exitcode == 0


def _env(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      LOCAL_WORLD_SIZE=str(world), NODE_RANK='0', MASTER_ADDR='127.0.0.1',
                      MASTER_PORT=str(port))
    sys.path.insert(0, os.path.dirname(__file__))


def _reference_samples(n: int) -> list:
    from lm_corpus import pattern
    rng = np.random.default_rng(5)
    return [{'tokens': pattern(rng).astype(np.int32)} for _ in range(n)]


def _three_rank_main(rank: int, world: int, port: int, data: str, ref: str, out: str) -> None:
    """Both three-rank checks in one spawn (starting three interpreters costs more than either):
    the reference gradient by hand over gloo, then a Composer run with the console, which reuses
    the process group."""
    _env(rank, world, port)
    import torch
    import torch.distributed as dist
    from composer.loggers import InMemoryLogger
    from lm_corpus import SEQ, VOCAB, make_trainer

    from streaming_mads.collate import TokenCollator
    from streaming_mads.influence import reference_gradient
    from streaming_mads.models import build_causal_lm
    dist.init_process_group('gloo')
    model = build_causal_lm(VOCAB, SEQ, 'tiny', seed=3, n_embd=32)
    for size in SIZES:
        share = _reference_samples(size)[rank::world]  # Shares of 1, 1, 0 or 2, 1, 1 samples.
        grad = reference_gradient(model, TokenCollator()(share) if share else None,
                                  num_samples=size)
        torch.save([g for g in grad.values()], os.path.join(out, f'grad{size}-{rank}.pt'))

    mem = InMemoryLogger()
    trainer, algo, _ = make_trainer(data, ref, max_duration='14ba', num_workers=1, loggers=[mem],
                                    console={'reference_size': 2, 'probe_size': 2})
    trainer.fit()
    state = algo.console.state_dict()
    with open(os.path.join(out, f'rank{rank}.json'), 'w') as f:
        json.dump({'theta': state['theta'], 'agents': state['agents'],
                   'candidates': [v for _, v in mem.data['mads/probe_candidates']]}, f)


SIZES = (2, 4)


@pytest.fixture(scope='module')
def three_ranks(tmp_path_factory):
    """What each of three gloo ranks computed (:func:`_three_rank_main`)."""
    from lm_corpus import write_corpus, write_reference
    tmp = str(tmp_path_factory.mktemp('three-ranks'))
    data = write_corpus(os.path.join(tmp, 'data'))
    ref = write_reference(os.path.join(tmp, 'ref'))
    _spawn(_three_rank_main, 3, (data, ref, tmp))
    return tmp


def test_three_ranks_reference_gradient_is_the_exact_mean(three_ranks):
    import torch
    from lm_corpus import SEQ, VOCAB

    from streaming_mads.collate import TokenCollator
    from streaming_mads.influence import reference_gradient
    from streaming_mads.models import build_causal_lm
    model = build_causal_lm(VOCAB, SEQ, 'tiny', seed=3, n_embd=32)
    for size in SIZES:
        batch = TokenCollator()(_reference_samples(size))
        expected = list(reference_gradient(model, batch).values())
        for rank in range(3):
            got = torch.load(os.path.join(three_ranks, f'grad{size}-{rank}.pt'))
            assert len(got) == len(expected)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-7)


def test_three_ranks_more_than_reference_and_probe_size(three_ranks):
    # World 3 > reference_size 2 and probe_size 2: a rank has no reference sample and at least
    # one has no probe, yet every rank takes part in every collective and ends identical.
    a, b, c = (json.load(open(os.path.join(three_ranks, f'rank{r}.json'))) for r in range(3))
    assert a == b == c and len(a['candidates']) == 2 and min(a['candidates']) > 0
    assert a['agents'][1]['memory'] != [1.0, 1.0, 1.0]  # The updates moved the weights.
