"""AgentConsole in real Composer runs: planted signal, resumption, errors, NaN handling."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from composer import Callback, Trainer
from composer.loggers import InMemoryLogger
from lm_corpus import make_trainer, write_corpus, write_reference
from torch.utils.data import DataLoader

from streaming_mads.algorithms import AgentConsole
from streaming_mads.collate import TokenCollator
from streaming_mads.influence import causal_lm_per_sample_loss
from streaming_mads.models import build_causal_lm


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp('lm')
    return write_corpus(os.path.join(root, 'data')), write_reference(os.path.join(root, 'ref'))


class BatchRecorder(Callback):
    """Records every training batch's input ids, keyed by batch number."""

    def __init__(self) -> None:
        self.batches: dict[int, torch.Tensor] = {}

    def before_forward(self, state, logger) -> None:
        self.batches[int(state.timestamp.batch.value)] = state.batch['input_ids'].clone()


def _series(mem: InMemoryLogger, key: str) -> list[float]:
    return [v for _, v in mem.data.get(key, [])]


def test_adam_reward_finds_the_planted_signal(corpus):
    # The influence of an Adam step (from the trainer's real AdamW state) ranks the same
    # planted values up and down.
    data, ref = corpus
    mem = InMemoryLogger()
    trainer, _, _ = make_trainer(data, ref, loggers=[mem], console={'reward': 'adam'})
    trainer.fit()
    assert _series(mem, 'mads/memory/domain/ref')[-1] > 1.5
    assert _series(mem, 'mads/memory/domain/noise')[-1] < 0.5
    assert _series(mem, 'mads/skipped_updates')[-1] == 0


def test_adam_reward_refuses_another_optimizer_before_the_first_batch(corpus):
    from streaming_mads.influence import InfluenceError
    data, ref = corpus
    trainer, _, _ = make_trainer(data, ref, console={'reward': 'adam'})
    trainer.state.optimizers = torch.optim.SGD(trainer.state.model.parameters(), lr=0.1)
    with pytest.raises(InfluenceError, match='Adam-family optimizer.*SGD.*reward: inner'):
        trainer.fit()
    assert int(trainer.state.timestamp.batch) == 0


def test_planted_signal_is_found(corpus):
    data, ref = corpus
    mem = InMemoryLogger()
    trainer, algo, ds = make_trainer(data, ref, loggers=[mem])
    trainer.fit()
    # Uniform start (mean-normalised memory 1) -> the reference-like domain and quality bin rise,
    # the noise domain falls.
    assert _series(mem, 'mads/memory/domain/ref')[-1] > 1.5
    assert _series(mem, 'mads/memory/domain/noise')[-1] < 0.5
    assert _series(mem, 'mads/memory/quality/ge4')[-1] > 1.5
    assert _series(mem, 'mads/memory/quality/lt1')[-1] < 0.5
    # The share of 'ref' among selected samples rises above its first window and its data share.
    share = _series(mem, 'mads/selected_share/domain/ref')
    assert len(share) >= 6
    data_share = ds.agents[1].freq[0] / ds.agents[1].freq.sum()
    assert np.mean(share[-3:]) > share[0] and np.mean(share[-3:]) > data_share + 0.1
    assert _series(mem, 'mads/skipped_updates')[-1] == 0
    assert all(t > 0 for t in _series(mem, 'mads/update_time_s'))
    names = [a.name for a in ds.agents]
    assert names == ['quality', 'domain', 'topic', 'similarity']  # Every labelled column.
    theta = dict(zip(names, (_series(mem, f'mads/theta/{a}')[-1] for a in names)))
    assert abs(sum(theta.values()) - 1) < 1e-9
    assert theta['topic'] < max(theta.values())  # Topic labels are random.
    # Repeat penalty: the favoured values' samples were kept again and again, and the published
    # weights are the memories divided by 1 + 0.1 x times kept.
    exhaustion = _series(mem, 'mads/repeat/max_exhaustion')
    assert np.all(np.diff(exhaustion) >= 0) and exhaustion[-1] > 5 * exhaustion[0]
    console = algo.console
    published = ds.weights(console.latest).memories
    for agent, e, pub in zip(ds.agents, console.exhaustion(), published):
        np.testing.assert_allclose(pub, agent.memory / (1 + 0.1 * e))
    ref = ds.agents[1].value_names.index('ref')
    assert console.exhaustion()[1][ref] > console.exhaustion()[1].min()


def test_reference_draws_are_fresh_seeded_and_cover_the_set():
    from streaming_mads.console import Console, ConsoleConfig

    def draws(seed: int) -> list:
        console = Console(ConsoleConfig(reference_size=8, seed=seed), list, None)
        console.reference = [{'i': i} for i in range(100)]
        return [console.reference_ids(v) for v in range(1, 60)]

    a, b = draws(3), draws(3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))  # Same on every rank.
    assert not np.array_equal(a[0], a[1]) and not np.array_equal(a[0], draws(4)[0])
    assert all(len(set(x.tolist())) == 8 for x in a)
    assert len(set(np.concatenate(a).tolist())) > 95  # Not a few fixed documents.


def _run(corpus, tmp, duration: str, **kwargs):
    data, ref = corpus
    rec = BatchRecorder()
    trainer, algo, ds = make_trainer(data, ref, max_duration=duration, num_workers=2,
                                     callbacks=[rec], **kwargs)
    trainer.fit()
    return rec, algo, trainer


def test_checkpoint_resume_mid_window_continues_exactly(corpus, tmp_path):
    full_rec, full_algo, _ = _run(corpus, tmp_path, '30ba')
    ckpt = os.path.join(tmp_path, 'ckpt')
    first_rec, _, first = _run(corpus, tmp_path, '30ba', save_folder=ckpt, save_interval='15ba')
    first.close()
    path = os.path.join(ckpt, 'ep0-ba15-rank0.pt')
    assert os.path.isfile(path) and 15 % 6 != 0  # Mid-window.
    resumed_rec, resumed_algo, _ = _run(corpus, tmp_path, '30ba', load_path=path)
    assert sorted(resumed_rec.batches) == list(range(15, 30))
    for b in range(15, 30):
        assert torch.equal(resumed_rec.batches[b], full_rec.batches[b]), b
    full_state = full_algo.console.state_dict()
    resumed_state = resumed_algo.console.state_dict()
    assert resumed_state['latest'] == full_state['latest'] == 5
    assert resumed_state['theta'] == full_state['theta']
    assert resumed_state['agents'] == full_state['agents']
    assert resumed_state['versions'] == full_state['versions']


def test_console_needs_a_mads_dataset(corpus):
    from streaming import StreamingDataset
    data, ref = corpus
    ds = StreamingDataset(local=data, batch_size=8)
    model = build_causal_lm(32, 16, 'tiny', n_embd=32)
    trainer = Trainer(model=model, train_dataloader=DataLoader(ds, batch_size=8,
                                                               collate_fn=TokenCollator()),
                      max_duration='2ba', algorithms=[AgentConsole(reference=ref)],
                      device='cpu', progress_bar=False)
    with pytest.raises(TypeError, match='MADSDataset'):
        trainer.fit()


def test_lead_must_exceed_prefetch_depth(corpus):
    data, ref = corpus
    trainer, _, _ = make_trainer(data, ref, num_workers=2, console={'lead': 4})
    with pytest.raises(ValueError, match='lead=4 must exceed .* prefetch depth'):
        trainer.fit()


def test_nonfinite_influence_skips_the_update(corpus):
    data, ref = corpus

    def nan_loss(model, batch):
        return causal_lm_per_sample_loss(model, batch) * math.nan

    mem = InMemoryLogger()
    trainer, algo, ds = make_trainer(data, ref, max_duration='13ba', loggers=[mem],
                                     console={'loss_fn': nan_loss})
    with pytest.warns(UserWarning, match='skipped'):
        trainer.fit()
    assert _series(mem, 'mads/skipped_updates') == [1.0, 2.0]
    for agent in ds.agents:
        assert np.all(agent.memory == 1.0)
    # The versions were still published (learned memories unchanged, only the repeat penalty of
    # what was kept moved them), so the data kept flowing.
    published = ds.weights(2)
    assert published is not None
    for pub, expected in zip(published.memories, algo.console.selection_memories()):
        np.testing.assert_array_equal(pub, expected)
        assert np.all(pub <= 1.0) and pub.min() > 0.9


def test_text_reference_is_tokenised_like_the_training_data(tmp_path):
    from streaming_mads.console.reference import load_reference
    from streaming_mads import MADSDataset
    from streaming_mads.convert.convert import convert
    from streaming_mads.labeling.label import label_dataset

    text = tmp_path / 'train.txt'
    text.write_text('The quick brown fox jumps over the lazy dog. ' * 40)
    data = str(tmp_path / 'data')
    convert([f'web={text}'], data, layout='single', seq_len=32, tokenizer='train',
            vocab_size=300, progress=False)
    label_dataset(data, columns=['domain'], progress=False)
    ds = MADSDataset(local=data, batch_size=2)
    ref = tmp_path / 'reference.jsonl'
    ref.write_text('\n'.join('{"text": "A lazy dog sleeps while the brown fox runs. %d"}' % i
                             for i in range(30)))
    samples = load_reference(str(ref), dataset=ds)
    assert len(samples) >= 4 and all(samples[i]['tokens'].shape == (32,) for i in range(4))
    assert samples[0]['tokens'].max() < 300  # The training tokenizer's vocabulary.
    with pytest.raises(FileNotFoundError, match='does not exist'):
        load_reference(str(tmp_path / 'missing'), dataset=ds)


@pytest.mark.parametrize('case', ['drop_last', 'subset'])
def test_versions_follow_composers_batches_over_epochs(tmp_path, case):
    # 325 samples in pools of 16: 20 full pools and one of 5 candidates (a partial batch of 5 < 8
    # that drop_last drops); or Composer's train_subset_num_batches cutting each epoch at 7.
    data = write_corpus(os.path.join(tmp_path, 'data'), n=325)
    ref = write_reference(os.path.join(tmp_path, 'ref'))
    mem = InMemoryLogger()
    kwargs = {'loader': {'drop_last': True}} if case == 'drop_last' else \
        {'train_subset_num_batches': 7}
    trainer, algo, ds = make_trainer(data, ref, max_duration='3ep', num_workers=2, loggers=[mem],
                                     console={'update_interval': 6, 'probe_size': 8},
                                     dataset={'version_timeout': 30}, **kwargs)
    per_epoch = 20 if case == 'drop_last' else 7
    assert ds.batches_per_epoch == 21
    trainer.fit()
    assert int(trainer.state.timestamp.batch) == 3 * per_epoch
    assert ds.board.batches_per_epoch == per_epoch
    # Every update found the logged pools of exactly the batches Composer ran since the last one.
    missing = _series(mem, 'mads/probe_log_missing')
    assert len(missing) == (3 * per_epoch + algo.console.lead) // 6 and missing[-1] == 0
    assert min(_series(mem, 'mads/probe_candidates')) > 0
