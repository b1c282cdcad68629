"""`mads train` from the shipped YAMLs, checkpoint resume, Composer's launcher, and the demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from lm_corpus import write_corpus, write_reference

from streaming_mads.run.cli import main
from streaming_mads.run.train import ConfigError, build_trainer
from streaming_mads.run.config import load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICKSTART = os.path.join(ROOT, 'yamls', 'quickstart-cpu.yaml')
BASELINE = os.path.join(ROOT, 'yamls', 'random-baseline-cpu.yaml')


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp('train')
    return write_corpus(os.path.join(root, 'data')), write_reference(os.path.join(root, 'ref'))


def _overrides(corpus, extra=()):
    data, ref = corpus
    return [f'train_loader.dataset.local={data}', f'algorithms.mads_console.reference={ref}',
            f'eval_loaders=[{{label: reference, dataset: {{local: {ref}}}}}]',
            'model.vocab_size=32', 'max_seq_len=16', 'model.n_embd=32', 'global_train_batch_size=8',
            'algorithms.mads_console.update_interval=4', 'eval_interval=4ba',
            'scheduler.t_warmup=2ba', *extra]


def test_train_quickstart_then_resume_from_checkpoint(corpus, tmp_path):
    ckpt = os.path.join(tmp_path, 'ckpt')
    args = _overrides(corpus, [f'save_folder={ckpt}', 'save_interval=6ba', 'max_duration=6ba'])
    assert main(['train', QUICKSTART, *args]) == 0
    saved = os.path.join(ckpt, 'ep0-ba6-rank0.pt')
    assert os.path.isfile(saved)
    state = torch.load(saved, weights_only=False)['state']
    console = dict(state['algorithms'])['AgentConsole']['console']
    assert console['latest'] == 2 and len(console['agents']) == 4
    r = load_config(QUICKSTART)['train_loader']['dataset']['pool_ratio']
    assert state['dataset_state']['train']['sample_in_epoch'] == 6 * 8 * r  # Candidates.
    cfg = load_config(QUICKSTART, _overrides(corpus, [f'load_path={saved}', 'max_duration=10ba']))
    trainer = build_trainer(cfg)
    assert int(trainer.state.timestamp.batch.value) == 6
    trainer.fit()
    assert int(trainer.state.timestamp.batch.value) == 10
    algo = trainer.state.algorithms[0]
    assert algo.console.latest == 3  # Version 3 published at batch 3*4 - lead(1) = 11 > 10.
    trainer.close()


def test_uniform_baseline_yaml_runs(corpus):
    data, ref = corpus
    cfg = load_config(BASELINE, [f'train_loader.dataset.local={data}', 'model.vocab_size=32',
                                 'max_seq_len=16', 'model.n_embd=32', 'max_duration=3ba',
                                 f'eval_loaders=[{{label: reference, dataset: {{local: {ref}}}}}]',
                                 'eval_interval=3ba', 'scheduler.t_warmup=1ba'])
    trainer = build_trainer(cfg)
    assert type(trainer.state.train_dataloader.dataset).__name__ == 'StreamingDataset'
    assert not trainer.state.algorithms
    trainer.fit()
    trainer.close()


@pytest.mark.parametrize('override,match', [
    ('bogus=1', "Unknown top-level key 'bogus'"),
    ('train_loader.name=nope', 'train_loader.name must be mads or streaming'),
    ('optimizer.name=adagrad', 'optimizer.name'),
    ('train_loader.dataset.pool_ratio=0.5', 'pool_ratio'),
    ('algorithms.mads_console.update_interval=0', 'update_interval'),
    ('algorithms.mads_console.probe_sizee=3', "algorithms.mads_console: .*probe_sizee"),
    ('global_train_batch_size=null', 'global_train_batch_size'),
    ('algorithms.bandit={}', 'mads_console and domain_bandit'),
    ('algorithms.domain_bandit={update_interval: 5}', 'not both'),
    ('algorithms={domain_bandit: {decay: 1.5}}', 'decay'),
    ('algorithms.mads_console.reward=dot', 'reward'),
])
def test_config_errors_name_the_key(corpus, override, match):
    with pytest.raises((ConfigError, ValueError), match=match):
        build_trainer(load_config(QUICKSTART, _overrides(corpus, [override])))


def test_cli_reports_config_errors(capsys, corpus):
    assert main(['train', QUICKSTART, *_overrides(corpus, ['model.family=rnn'])]) == 2
    assert 'model' in capsys.readouterr().err


def test_two_processes_under_composer_launcher(corpus, tmp_path):
    launcher = shutil.which('composer', path=os.path.dirname(sys.executable))
    assert launcher, 'Composer\'s launcher is installed with composer'
    args = _overrides(corpus, ['max_duration=8ba', 'train_loader.num_workers=0',
                               f'save_folder={tmp_path}/ckpt', 'save_interval=8ba'])
    env = {**os.environ, 'PYTHONUNBUFFERED': '1'}
    proc = subprocess.run([launcher, '-n', '2', '--master_port', '29731', '--stdout',
                           f'{tmp_path}/rank{{rank}}.out', '--stderr', f'{tmp_path}/rank{{rank}}.err',
                           '-m', 'streaming_mads.run.cli', 'train', QUICKSTART, *args],
                          env=env, capture_output=True, text=True, timeout=600)
    logs = ''.join(open(os.path.join(tmp_path, f'rank{r}.err')).read()[-3000:] for r in range(2)
                   if os.path.exists(os.path.join(tmp_path, f'rank{r}.err')))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + logs
    state = torch.load(os.path.join(tmp_path, 'ckpt', 'ep0-ba8-rank0.pt'),
                       weights_only=False)['state']
    # 8 global batches of 8 (4 per rank), r candidates per kept sample.
    r = load_config(QUICKSTART)['train_loader']['dataset']['pool_ratio']
    assert state['dataset_state']['train']['sample_in_epoch'] == 8 * 8 * r
    algo = dict(state['algorithms'])['AgentConsole']
    assert algo['console']['latest'] == 2 and len(algo['rng']) == 2  # One RNG state per rank.


def test_demo_pipeline_on_a_reduced_budget(tmp_path):
    from streaming_mads.run.demo import run_demo
    from streaming_mads.corpora.demo import DOMAINS

    out = os.path.join(tmp_path, 'demo')
    results = run_demo(out, budget='12ba', code_bytes=150_000, seq_len=64, vocab_size=512,
                       progress=False, overrides=['algorithms.mads_console.update_interval=5',
                                                  'eval_interval=6ba'])
    text = os.path.join(out, 'text')  # The corpus it built: every domain, disjoint target sets.
    for domain in DOMAINS:
        assert len(os.listdir(os.path.join(text, 'train', domain))) > 5, domain
    reference, evaluation = (os.listdir(os.path.join(text, s)) for s in ('reference', 'evaluation'))
    assert len(reference) > 5 and len(evaluation) > 5 and not set(reference) & set(evaluation)
    assert results['mads']['batches'] == results['uniform']['batches'] == 12
    assert results['mads']['tokens'] == results['uniform']['tokens']
    assert set(results['mads']['eval']) >= {'reference', 'evaluation'} | \
        {f'heldout_{d}' for d in DOMAINS}
    # Versions 1-3 are published at batches 5k - lead(3) = 2, 7, 12.
    assert len(results['mads']['mads']['mads/theta/domain'][1]) == 3
    with open(os.path.join(out, 'results.json')) as f:
        summary = json.load(f)['summary']
    for label in ('evaluation', 'reference'):
        assert summary[label]['target'] == results['uniform']['eval'][label][1][-1]
        if summary[label]['batches'] is not None:
            assert 0 < summary[label]['tokens'] <= summary[label]['flops']
            assert summary[label]['wall'] > 0
    assert os.path.getsize(os.path.join(out, 'results.png')) > 10_000
    assert 'never seen by the console' in open(os.path.join(out, 'results.txt')).read()


@pytest.mark.parametrize('name', ['gpu-125m.yaml', 'gpu-1b.yaml'])
def test_gpu_yamls_only_use_known_settings(name):
    """The cluster configs cannot run here (object storage, GPUs); check every key they use."""
    import inspect

    from streaming import Stream, StreamingDataset

    from streaming_mads.algorithms import AgentConsole
    from streaming_mads import MADSDataset
    from streaming_mads.models import PRESETS
    from streaming_mads.run.config import TOP_LEVEL

    cfg = load_config(os.path.join(ROOT, 'yamls', name))
    assert set(cfg) <= TOP_LEVEL
    assert cfg['model']['preset'] in PRESETS
    dataset_keys = set(inspect.signature(MADSDataset).parameters) | \
        set(inspect.signature(StreamingDataset).parameters)
    dataset = dict(cfg['train_loader']['dataset'])
    for stream in dataset.pop('streams').values():
        assert set(stream) <= set(inspect.signature(Stream).parameters)
    assert set(dataset) <= dataset_keys
    AgentConsole(**cfg['algorithms']['mads_console'])  # Unknown keys and bad values raise.
    assert cfg['global_train_batch_size'] % 8 == 0


def test_a_reference_without_its_split_is_a_config_error(corpus, capsys):
    """The reference's split is checked when the Trainer is built, named by key (it used to read
    a directory without its split as text, or fail only at the first batch)."""
    _, ref = corpus
    with pytest.raises(ConfigError, match=r"algorithms\.mads_console\.reference: .* no MDS index "
                                          r"for split 'val'.*Set mads_console\.reference_split"):
        build_trainer(load_config(QUICKSTART, _overrides(
            corpus, ['algorithms.mads_console.reference_split=val'])))
    assert main(['train', QUICKSTART, *_overrides(
        corpus, ['algorithms.mads_console.reference_split=val'])]) == 2
    assert f"{ref} has no MDS index for split 'val'" in capsys.readouterr().err


@pytest.mark.parametrize('name', ['quickstart-cpu.yaml', 'random-baseline-cpu.yaml',
                                  'gpu-125m.yaml', 'gpu-1b.yaml'])
def test_every_shipped_yaml_evaluates_on_a_set_the_console_never_sees(name):
    """Each YAML evaluates on the reference and on a held-out set other than it, so a run can
    tell fitting the reference from learning what it stands for."""
    from streaming_mads.run.config import shipped_configs
    assert name in shipped_configs()
    cfg = load_config(name)
    reference = (cfg.get('algorithms') or {}).get('mads_console', {}).get('reference') or \
        load_config('quickstart-cpu.yaml')['algorithms']['mads_console']['reference']
    paths = [e['dataset'].get('remote') or e['dataset']['local'] for e in cfg['eval_loaders']]
    assert reference in paths, (name, paths)
    assert set(paths) - {reference}, (name, paths)


def test_quickstart_paths_follow_its_variables_and_the_console_reference():
    cfg = load_config(QUICKSTART, ['variables.data=/d', 'variables.evaluation=/e',
                                   'variables.reference=/r'])
    assert cfg['train_loader']['dataset']['local'] == '/d' and 'variables' not in cfg
    assert [e['dataset']['local'] for e in cfg['eval_loaders']] == ['/e', '/r']
    cfg = load_config(QUICKSTART, ['algorithms.mads_console.reference=/r2'])
    assert cfg['eval_loaders'][1]['dataset']['local'] == '/r2'  # Evaluated on what steers.
