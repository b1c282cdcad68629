"""The ODM-style domain bandit baseline: EXP3 math and a real Composer run."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from composer import Trainer
from composer.loggers import InMemoryLogger
from lm_corpus import SEQ, VOCAB, write_corpus
from torch.utils.data import DataLoader

from streaming_mads.console.bandit import exp3_policy, exp3_update, exploration_rate, memory_for_shares


def test_exp3_math():
    assert exploration_rate(0, 4) == 0.25 and exploration_rate(1, 4) == 0.25
    assert exploration_rate(100, 4) == pytest.approx(np.sqrt(np.log(4) / 400))
    np.testing.assert_allclose(exp3_policy(np.array([9.0, 1, 1, 1]), 1), 0.25)  # Explore first.
    pi = exp3_policy(np.array([9.0, 1, 1, 1]), 50)
    assert abs(pi.sum() - 1) < 1e-12 and pi.argmax() == 0 and pi.min() >= exploration_rate(50, 4)
    est = exp3_update(np.zeros(3), np.array([0.5, 0.25, 0.25]), np.array([2.0, np.nan, 1.0]), 0.9)
    np.testing.assert_allclose(est, [0.1 * 2 / 0.5, 0.0, 0.1 * 1 / 0.25])  # Unmeasured: kept.
    w = memory_for_shares(np.array([0.5, 0.25, 0.25]), np.array([100, 300, 600]))
    shares = w * np.array([0.1, 0.3, 0.6])
    np.testing.assert_allclose(shares / shares.sum(), [0.5, 0.25, 0.25])
    assert abs(w.mean() - 1) < 1e-12


def test_domain_bandit_moves_toward_the_highest_loss_domain(tmp_path):
    from streaming_mads.algorithms import DomainBandit
    from streaming_mads import MADSDataset
    from streaming_mads.collate import TokenCollator
    from streaming_mads.models import build_causal_lm

    data = write_corpus(os.path.join(tmp_path, 'data'))
    ds = MADSDataset(local=data, batch_size=8, shuffle=True, pool_ratio=2, temperature=1.0,
                     agents=['domain'])
    model = build_causal_lm(VOCAB, SEQ, 'tiny', seed=0, n_embd=32)
    mem = InMemoryLogger()
    algo = DomainBandit(update_interval=6, probe_size=24)
    trainer = Trainer(model=model, max_duration='60ba', algorithms=[algo], loggers=[mem],
                      train_dataloader=DataLoader(ds, batch_size=8, collate_fn=TokenCollator()),
                      optimizers=torch.optim.AdamW(model.parameters(), lr=3e-3), device='cpu',
                      progress_bar=False, log_to_console=False, seed=0)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.fit()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    policy = {d: mem.data[f'mads/bandit/policy/{d}'][-1][1] for d in ('ref', 'noise', 'other')}
    assert abs(sum(policy.values()) - 1) < 1e-9
    # Uniform random tokens stay the hardest to predict: the bandit samples them most.
    assert policy['noise'] > max(policy['ref'], policy['other'])
    assert algo.console.steps == len(mem.data['mads/bandit/policy/noise'])
    # What the workers select by is the policy, as memory 1/p-weighted.
    agent = ds.agents[0]
    published = ds.weights(algo.console.latest).memories[0]
    np.testing.assert_allclose(published, memory_for_shares(algo.console.policy(), agent.freq))
    assert published.argmax() == agent.value_names.index('noise')
