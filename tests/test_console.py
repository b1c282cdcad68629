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


@pytest.mark.parametrize('console', [{'reward': 'adam'}, {'rule': 'evidence'}])
def test_planted_signal_is_found_by_adam_and_by_the_evidence_rule(corpus, console):
    # The influence of an Adam step (from the trainer's real AdamW state) ranks the same
    # planted values up and down; so does the evidence rule (memories from the accumulated
    # evidence, θ = 1, gates logged: the informative domain opens, the random topic less).
    data, ref = corpus
    mem = InMemoryLogger()
    trainer, _, ds = make_trainer(data, ref, loggers=[mem], console=console)
    trainer.fit()
    assert _series(mem, 'mads/memory/domain/ref')[-1] > 1.5
    assert _series(mem, 'mads/memory/domain/noise')[-1] < 0.5
    assert _series(mem, 'mads/skipped_updates')[-1] == 0
    if console.get('rule') == 'evidence':
        assert _series(mem, 'mads/gate/domain')[-1] > 0.5
        assert _series(mem, 'mads/gate/topic')[-1] < _series(mem, 'mads/gate/domain')[-1]
        assert all(_series(mem, f'mads/theta/{a.name}')[-1] == 1.0 for a in ds.agents)


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


@pytest.mark.parametrize('rule', ['paper', 'evidence'])
def test_checkpoint_resume_mid_window_continues_exactly(corpus, tmp_path, rule):
    console = {'rule': rule}
    full_rec, full_algo, _ = _run(corpus, tmp_path, '30ba', console=console)
    ckpt = os.path.join(tmp_path, 'ckpt')
    first_rec, _, first = _run(corpus, tmp_path, '30ba', save_folder=ckpt, save_interval='15ba',
                               console=console)
    first.close()
    path = os.path.join(ckpt, 'ep0-ba15-rank0.pt')
    assert os.path.isfile(path) and 15 % 6 != 0  # Mid-window.
    resumed_rec, resumed_algo, _ = _run(corpus, tmp_path, '30ba', load_path=path, console=console)
    assert sorted(resumed_rec.batches) == list(range(15, 30))
    for b in range(15, 30):
        assert torch.equal(resumed_rec.batches[b], full_rec.batches[b]), b
    full_state = full_algo.console.state_dict()
    resumed_state = resumed_algo.console.state_dict()
    assert resumed_state['latest'] == full_state['latest'] == 5
    assert resumed_state['theta'] == full_state['theta']
    assert resumed_state['agents'] == full_state['agents']
    assert resumed_state['versions'] == full_state['versions']
    assert resumed_state['evidence'] == full_state['evidence']
    assert (full_state['evidence'] is None) == (rule == 'paper')


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


def test_a_directory_holding_an_mds_index_is_never_read_as_text(tmp_path):
    """A reference directory whose index sits in a split folder, given without reference_split,
    was read as a text directory: the console steered by its README. Now the error names the
    splits found and the key; a missing split is named too."""
    from streaming import MDSWriter

    from streaming_mads.console.reference import load_reference, reference_tokenizer_info
    ref = tmp_path / 'ref'
    with MDSWriter(out=str(ref / 'train'), columns={'tokens': 'ndarray:int32'}) as w:
        for i in range(4):
            w.write({'tokens': np.arange(16, dtype=np.int32) + i})
    (ref / 'README.md').write_text('# The reference set\n\n' + 'It holds held-out text. ' * 20)
    train = [{'tokens': np.zeros(16, dtype=np.int32)}]  # The training samples' form.
    for load in (lambda split: load_reference(str(ref), split, dataset=train, tokenizer='bytes'),
                 lambda split: reference_tokenizer_info(str(ref), split, tokenizer='bytes')):
        with pytest.raises(FileNotFoundError, match=r'no MDS index at its top .*Its MDS indexes '
                                                    r'are in: train\. Set mads_console\.'
                                                    r'reference_split'):
            load(None)
        with pytest.raises(FileNotFoundError, match=r"for split 'val': no .*val.index\.json\. "
                                                    r'Its MDS indexes are in: train\.'):
            load('val')
    assert len(load_reference(str(ref), 'train')) == 4
    # Streams below (a `mads convert` output with a split per stream) are MDS too.
    nested = tmp_path / 'nested'
    os.renames(str(ref / 'train'), str(nested / 'web' / 'train'))
    with pytest.raises(FileNotFoundError, match=r'in: web/train\.'):
        load_reference(str(nested), dataset=train, tokenizer='bytes')
    # A split given for text is not silently ignored.
    (tmp_path / 'text').mkdir()
    (tmp_path / 'text' / 'ref.txt').write_text('Some reference text. ' * 20)
    with pytest.raises(FileNotFoundError, match=r"for split 'train' or below it"):
        load_reference(str(tmp_path / 'text'), 'train', dataset=train, tokenizer='bytes')


_TEXT_REFERENCE_RUN = """
import os, sys, tempfile, torch
from composer import Callback, Trainer
from torch.utils.data import DataLoader
from streaming_mads import MADSDataset
from streaming_mads.algorithms import AgentConsole
from streaming_mads.collate import TokenCollator
from streaming_mads.models import build_causal_lm
data, reference, tmp = sys.argv[1:]
assert tempfile.gettempdir() == tmp
seen = []
class Watch(Callback):
    def batch_end(self, state, logger):
        seen.append(len([p for p in os.listdir(tmp) if p.startswith('mads_ref_')]))
ds = MADSDataset(local=data, batch_size=4, pool_ratio=2)
model = build_causal_lm(257, 16, 'tiny', seed=0, n_embd=32)
trainer = Trainer(model=model, optimizers=torch.optim.AdamW(model.parameters(), lr=1e-3),
                  train_dataloader=DataLoader(ds, batch_size=4, collate_fn=TokenCollator()),
                  max_duration='4ba', device='cpu', progress_bar=False, log_to_console=False,
                  algorithms=[AgentConsole(reference=reference, update_interval=2, probe_size=8,
                                           reference_size=4)], callbacks=[Watch()])
trainer.fit()
print('copies while training:', seen)
"""


def test_a_text_references_copy_is_removed_when_the_console_is_done(tmp_path):
    """A text reference is tokenised into a temporary MDS copy (`mads_ref_*`), which used to stay
    in the temp dir after the run. It lives as long as the reference: it is removed when the
    reference is garbage-collected or at exit, and at once when loading fails."""
    import gc
    import subprocess
    import sys

    from streaming_mads import MADSDataset
    from streaming_mads.convert.convert import ConvertError, convert
    from streaming_mads.console.reference import load_reference
    from streaming_mads.labeling.label import label_dataset

    tmp = tmp_path / 'tmp'
    tmp.mkdir()
    text = tmp_path / 'train.txt'
    text.write_text('The quick brown fox jumps over the lazy dog. ' * 40)
    data = str(tmp_path / 'data')
    convert([f'web={text}'], data, layout='single', seq_len=16, progress=False)
    label_dataset(data, columns=['domain'], progress=False)
    ref = tmp_path / 'reference.txt'
    ref.write_text('A lazy dog sleeps while the brown fox runs. ' * 30)
    run = subprocess.run([sys.executable, '-c', _TEXT_REFERENCE_RUN, data, str(ref), str(tmp)],
                         env={**os.environ, 'TMPDIR': str(tmp)}, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'copies while training: [1, 1, 1, 1]' in run.stdout  # There while training...
    assert not list(tmp.glob('mads_ref_*'))  # ...and gone once the console is done.

    ds = MADSDataset(local=data, batch_size=4, pool_ratio=2)
    train_tmp = tmp_path / 'in_process'
    train_tmp.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        import tempfile
        mp.setattr(tempfile, 'tempdir', str(train_tmp))
        reference = load_reference(str(ref), dataset=ds, tokenizer='bytes')
        assert len(reference) > 4 and len(list(train_tmp.glob('mads_ref_*'))) == 1
        del reference
        gc.collect()
        assert not list(train_tmp.glob('mads_ref_*'))
        (tmp_path / 'empty.txt').write_text('')
        with pytest.raises(ConvertError):
            load_reference(str(tmp_path / 'empty.txt'), dataset=ds, tokenizer='bytes')
        assert not list(train_tmp.glob('mads_ref_*'))


def test_resume_with_another_num_workers_keeps_the_checkpointed_lead(corpus, tmp_path):
    """The default lead follows num_workers x prefetch_factor; the checkpoint records the lead
    the run used, so a resume with fewer workers continues exactly, one whose prefetch the lead
    cannot stay ahead of is refused, and a checkpoint without the record still loads."""
    data, ref = corpus
    full_rec, _, _ = _run(corpus, tmp_path, '30ba')  # num_workers=2: lead 2 x 2 + 1 = 5.
    ckpt = os.path.join(tmp_path, 'ckpt')
    _, _, first = _run(corpus, tmp_path, '15ba', save_folder=ckpt, save_interval='15ba')
    first.close()
    path = os.path.join(ckpt, 'ep0-ba15-rank0.pt')
    saved = torch.load(path, weights_only=False)
    assert dict(saved['state']['algorithms'])['AgentConsole']['console']['schedule'] == \
        {'update_interval': 6, 'lead': 5, 'batches_per_epoch': 75}
    rec = BatchRecorder()
    trainer, algo, _ = make_trainer(data, ref, max_duration='30ba', num_workers=1,
                                    callbacks=[rec], load_path=path)
    trainer.fit()
    assert algo.console.lead == 5  # Not 1 x 2 + 1 = 3.
    assert sorted(rec.batches) == list(range(15, 30))
    for b in range(15, 30):
        assert torch.equal(rec.batches[b], full_rec.batches[b]), b
    trainer.close()
    # A checkpoint taken without workers (lead 1) cannot keep its schedule under a prefetch of 2.
    ckpt0 = os.path.join(tmp_path, 'ckpt0')
    trainer, _, _ = make_trainer(data, ref, max_duration='3ba', save_folder=ckpt0,
                                 save_interval='3ba')
    trainer.fit()
    trainer.close()
    trainer, _, _ = make_trainer(data, ref, max_duration='6ba', num_workers=1,
                                 load_path=os.path.join(ckpt0, 'ep0-ba3-rank0.pt'))
    with pytest.raises(ValueError, match=r'checkpoint was taken with mads_console lead=1.*'
                                         r'prefetch depth num_workers x prefetch_factor = 2'):
        trainer.fit()
    trainer.close()
    # A checkpoint from before the schedule was recorded loads as before (the default lead).
    console = dict(saved['state']['algorithms'])['AgentConsole']['console']
    del console['schedule']
    old = os.path.join(tmp_path, 'old.pt')
    torch.save(saved, old)
    trainer, algo, _ = make_trainer(data, ref, max_duration='17ba', num_workers=1, load_path=old)
    trainer.fit()
    assert algo.console.lead == 3 and int(trainer.state.timestamp.batch) == 17
    trainer.close()
